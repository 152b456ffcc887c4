"""Our logits processing against transformers' own processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker.engine.sampling import (
    ARGMAX_CHUNK,
    ARGMAX_FEWEST,
    SamplingSpec,
    choose_tokens,
    greedy_argmax,
    make_generator,
    process_logits,
)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=gen) * 3
    ids = torch.randint(0, 50, (3, 12), generator=gen)
    ids[:, 6:9] = ids[:, 0:3]  # a repeated trigram prefix for the n-gram ban
    return scores, ids


def test_processors_match_transformers() -> None:
    scores, ids = _inputs()
    spec = SamplingSpec(
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.8,
        repetition_penalty=1.3,
        no_repeat_ngram_size=3,
    )
    expected = scores.clone()
    for processor in (
        RepetitionPenaltyLogitsProcessor(1.3),
        NoRepeatNGramLogitsProcessor(3),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
    ):
        expected = processor(ids, expected)
    assert torch.equal(process_logits(scores, ids, spec), expected)


def test_greedy_ignores_warpers() -> None:
    scores, _ = _inputs()
    spec = SamplingSpec(do_sample=False, temperature=0.1, top_k=1)
    assert spec.plain_greedy
    assert torch.equal(choose_tokens(scores, None, spec, None), scores.argmax(-1))


def test_seeded_draws_repeat() -> None:
    scores, _ = _inputs()
    spec = SamplingSpec(do_sample=True)
    first = choose_tokens(scores, None, spec, make_generator(5))
    again = choose_tokens(scores, None, spec, make_generator(5))
    assert torch.equal(first, again)


def test_no_repeat_ngram_matches_transformers_for_every_size() -> None:
    """The vectorized ban equals transformers' processor, short rows and repeats included."""
    from worker.engine.sampling import apply_no_repeat_ngram

    gen = torch.Generator().manual_seed(1)
    for length in (1, 2, 3, 7, 40):
        ids = torch.randint(0, 6, (4, length), generator=gen)  # a small vocabulary: many repeats
        scores = torch.randn(4, 6, generator=gen)
        for n in (1, 2, 3, 4, 5):
            expected = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
            assert torch.equal(apply_no_repeat_ngram(scores, ids, n), expected), (length, n)


@pytest.mark.parametrize("vocab", [50257, 32000, 4 * ARGMAX_CHUNK, 4 * ARGMAX_CHUNK + 1, 100, 1])
def test_greedy_argmax_is_torch_argmax(vocab: int) -> None:
    """The chunked argmax gives torch.argmax's indices: the first maximum (ties across
    and inside chunks, the last short chunk), the first NaN, rows all -inf or +inf."""
    gen = torch.Generator().manual_seed(0)
    rows = max(12, -(-ARGMAX_FEWEST // vocab))  # enough for the chunked path where it applies
    for trial in range(20):
        scores = torch.randn(rows, vocab, generator=gen)
        if trial % 2:  # few distinct values: many ties, often in different chunks
            scores = scores.round()
        cols = torch.randint(0, vocab, (rows, 3), generator=gen)
        scores[1, cols[1]] = float("nan")  # NaNs: argmax takes the first
        scores[2] = float("-inf")
        scores[3, cols[3]] = float("inf")
        scores[4, -1] = scores[4].max() + 1  # the maximum in the very last column
        scores[5, 0] = scores[5].max() + 1
        assert torch.equal(greedy_argmax(scores), torch.argmax(scores, dim=-1)), trial


def test_greedy_argmax_of_views_and_in_bf16() -> None:
    last = torch.randn(6, 3, 50257)[:, -1]  # a model's last position: rows apart, each whole
    last[2, 40000:] = last[2].max() + 1  # ties in the last chunks: the first one
    assert torch.equal(greedy_argmax(last), torch.argmax(last, dim=-1))
    scores = torch.randn(50257, 6).t()  # columns apart
    assert torch.equal(greedy_argmax(scores), torch.argmax(scores, dim=-1))
    half = torch.randn(5, 50257).bfloat16()
    assert torch.equal(greedy_argmax(half), torch.argmax(half, dim=-1))

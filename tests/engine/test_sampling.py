"""Our logits processing against transformers' own processors."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker.engine.sampling import SamplingSpec, choose_tokens, make_generator, process_logits


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

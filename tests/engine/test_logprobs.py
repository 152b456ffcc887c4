"""Log-probabilities from the batching engine against transformers' raw logits."""

from __future__ import annotations

import math
from typing import Any

import torch

from tests.engine.helpers import request

PROMPT = "Once upon a time"


def generate_logprobs(loaded: Any, prompt: str, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-softmax of the raw logits at each step, from generate."""
    model, tokenizer, _ = loaded
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **ids,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = out.sequences[0, ids.input_ids.shape[1] :].tolist()
    return tokens, torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)


def test_greedy_logprobs_equal_generate(loaded: Any, make_engine: Any) -> None:
    """Each token's logprob and the top 3 are those of generate's raw logits, in a
    batch shared with other requests (some of which do not ask for logprobs)."""
    _, tokenizer, _ = loaded
    engine = make_engine(loaded)
    others = [engine.submit(request(p, max_new_tokens=7)) for p in ("The dog", "Hello")]
    result = engine.submit(
        request(PROMPT, max_new_tokens=12, logprobs=True, top_logprobs=3)
    ).result(timeout=30)
    for other in others:
        assert other.result(timeout=30).logprobs is None
    tokens, expected = generate_logprobs(loaded, PROMPT, 12)
    assert result.logprobs is not None
    entries = result.logprobs[0]
    assert len(entries) == len(tokens)  # greedy on these prompts reaches no EOS
    for step, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
        assert entry["token"] == tokenizer.decode([token])
        assert entry["bytes"] == list(entry["token"].encode())
        assert math.isclose(entry["logprob"], expected[step, token].item(), abs_tol=1e-4)
        values, indices = torch.topk(expected[step], 3)
        assert [t["token"] for t in entry["top_logprobs"]] == [
            tokenizer.decode([i]) for i in indices.tolist()
        ]
        for top, value in zip(entry["top_logprobs"], values.tolist(), strict=True):
            assert math.isclose(top["logprob"], value, abs_tol=1e-4)
        # Greedy: the chosen token is the likeliest one.
        assert math.isclose(entry["logprob"], entry["top_logprobs"][0]["logprob"], abs_tol=1e-6)


def test_sampled_logprobs_are_raw_not_processed(stories: Any, make_engine: Any) -> None:
    """With temperature and top-k, logprobs still score the raw distribution: the
    top_logprobs of every position sum to at most 1 and include tokens top-k cut."""
    engine = make_engine(stories)
    result = engine.submit(
        request(
            PROMPT,
            seed=5,
            max_new_tokens=10,
            do_sample=True,
            temperature=0.3,
            top_k=1,
            num_return_sequences=2,
            logprobs=True,
            top_logprobs=5,
        )
    ).result(timeout=30)
    assert result.logprobs is not None and len(result.logprobs) == 2
    for entries in result.logprobs:
        assert len(entries) == 10
        for entry in entries:
            mass = sum(math.exp(t["logprob"]) for t in entry["top_logprobs"])
            assert mass <= 1.0 + 1e-5
            # top_k=1 after temperature would make the chosen token's processed
            # probability 1; the raw one is below 1 on at least these positions.
            assert entry["logprob"] < 0.0

"""Per-request logits processing and token choice, with transformers' semantics.

The order is the one ``generate`` uses: repetition penalty, no-repeat n-grams,
then (sampling only) temperature, top-k, top-p, softmax and a multinomial draw.
Every function takes the rows of *one* request (``[n, vocab]`` scores and the
``[n, length]`` unpadded token ids of those rows), so a request's rows share its
seeded ``torch.Generator`` and draw exactly as ``generate`` would for that
request alone.
"""

from __future__ import annotations

import dataclasses

import torch

from core.schemas import GenerationParams

_NEG_INF = float("-inf")

ARGMAX_CHUNK = 512
"""Columns per chunk of :func:`greedy_argmax` on a CPU."""
ARGMAX_FEWEST = 1 << 16
"""Scores below which :func:`greedy_argmax` is ``torch.argmax`` (fewer: no faster)."""


def greedy_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(scores, dim=-1)`` of ``[rows, vocab]`` scores, the same indices
    (the first maximum; the first NaN where a row holds one), 4-6x faster on a CPU at
    a vocabulary of 32-128k (bench/README.md, issue 13).

    PyTorch's CPU argmax keeps an index beside every compared value and does not
    vectorize, while a plain maximum does: so each row's maximum is found per chunk of
    :data:`ARGMAX_CHUNK` columns, and argmax runs only over the chunk maxima and then
    inside the first chunk holding the row's maximum. Elsewhere (a GPU, a small
    vocabulary, one row of GPT-2's, rows that are not contiguous) it is
    ``torch.argmax``."""
    if (
        scores.dim() != 2
        or scores.device.type != "cpu"
        or scores.numel() < ARGMAX_FEWEST
        or scores.shape[1] < 4 * ARGMAX_CHUNK
        or scores.stride(1) != 1
    ):
        return torch.argmax(scores, dim=-1)
    rows, vocab = scores.shape
    chunks = vocab // ARGMAX_CHUNK
    whole = chunks * ARGMAX_CHUNK
    maxima = scores[:, :whole].view(rows, chunks, ARGMAX_CHUNK).amax(-1)
    if whole < vocab:  # the last, shorter chunk
        maxima = torch.cat([maxima, scores[:, whole:].amax(-1, keepdim=True)], dim=1)
    start = maxima.argmax(-1) * ARGMAX_CHUNK
    # The chunk's columns; past the vocabulary they repeat its last column, which
    # comes after it, so the first maximum is still the one inside.
    columns = (start[:, None] + torch.arange(ARGMAX_CHUNK)).clamp_(max=vocab - 1)
    return start + scores.gather(1, columns).argmax(-1)


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """The decoding knobs that shape one token choice."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def from_params(cls, params: GenerationParams) -> SamplingSpec:
        """The sampling part of a job's parameters."""
        return cls(
            do_sample=params.do_sample,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            no_repeat_ngram_size=params.no_repeat_ngram_size,
        )

    @property
    def needs_history(self) -> bool:
        """Whether the choice depends on the tokens so far (not only on the logits)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: such rows are decided for the whole batch at once."""
        return not self.do_sample and not self.needs_history


def apply_repetition_penalty(
    scores: torch.Tensor, input_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty on every token already present (prompt included)."""
    score = torch.gather(scores, 1, input_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, input_ids, score)


def apply_no_repeat_ngram(scores: torch.Tensor, input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid tokens that would repeat an n-gram of the row's sequence.

    Vectorized over rows and positions (no Python loop per token): each window of
    ``n`` tokens whose first ``n - 1`` equal the row's last ``n - 1`` bans its last token,
    as transformers' ``NoRepeatNGramLogitsProcessor`` does.
    """
    length = input_ids.shape[1]
    if length < n:  # no complete n-gram yet
        return scores
    windows = input_ids.unfold(1, n, 1)  # [rows, length - n + 1, n]
    prefix = input_ids[:, length - n + 1 :]  # the last n - 1 tokens
    match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(dim=-1)
    banned = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    banned.scatter_add_(1, windows[:, :, -1].to(scores.device), match.to(torch.int32))
    return scores.masked_fill(banned > 0, _NEG_INF)


def apply_top_k(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the ``top_k`` highest logits (ties at the threshold are kept, as in transformers)."""
    top_k = min(max(top_k, min_tokens_to_keep), scores.size(-1))
    threshold = torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(scores < threshold, _NEG_INF)


def apply_top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose mass is at most ``1 - top_p``."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -min_tokens_to_keep:] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    return scores.masked_fill(remove, _NEG_INF)


def process_logits(
    scores: torch.Tensor,
    input_ids: torch.Tensor | None,
    spec: SamplingSpec,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """Apply the spec's processors to one request's float32 ``[n, vocab]`` scores.

    ``input_ids`` (``[n, length]``, no padding) is needed only when
    :attr:`SamplingSpec.needs_history`. ``min_tokens_to_keep`` is that of generate's
    top-k and top-p warpers (more than 1 under beam sampling).
    """
    if spec.repetition_penalty != 1.0:
        assert input_ids is not None
        scores = apply_repetition_penalty(scores, input_ids, spec.repetition_penalty)
    if spec.no_repeat_ngram_size > 0:
        assert input_ids is not None
        scores = apply_no_repeat_ngram(scores, input_ids, spec.no_repeat_ngram_size)
    if spec.do_sample:
        if spec.temperature != 1.0:
            scores = scores / spec.temperature
        if spec.top_k != 0:
            scores = apply_top_k(scores, spec.top_k, min_tokens_to_keep)
        if spec.top_p < 1.0:
            scores = apply_top_p(scores, spec.top_p, min_tokens_to_keep)
    return scores


def choose_tokens(
    scores: torch.Tensor,
    input_ids: torch.Tensor | None,
    spec: SamplingSpec,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each of one request's rows (``[n]``, int64)."""
    scores = process_logits(scores, input_ids, spec)
    if spec.do_sample:
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # e.g. logits / a tiny temperature overflowed
            raise FloatingPointError("the sampling probabilities are not finite")
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return greedy_argmax(scores)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator, so concurrent requests never share random state."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator

"""The state of one request inside the batching engine, and how its text is made.

A request owns ``n`` rows of the running batch (``num_return_sequences``); its
rows join together and leave together, so a sampling request draws from its own
generator on an ``[n, vocab]`` slice exactly as ``generate`` would.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import torch

from worker.engine.base import FinishReason, GenerationError, GenerationRequest, GenerationResult
from worker.engine.constrained import Constraint, unpack_bitmask
from worker.engine.logprobs import TokenLogprob, position_logprobs, to_entries
from worker.engine.sampling import SamplingSpec

# Extra tokens decoded before the tail when looking for stop strings: some
# tokenizers drop a leading space on the first token they decode.
_TAIL_CONTEXT = 2


def strip_prefix(full: str, prefix: str) -> str:
    """``full`` without ``prefix``; when decoding merged across the boundary,
    without their longest common prefix."""
    if full.startswith(prefix):
        return full[len(prefix) :]
    common = 0
    for a, b in zip(full, prefix, strict=False):
        if a != b:
            break
        common += 1
    return full[common:]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclasses.dataclass(eq=False)
class RequestState:
    """One request from submission to its resolved future."""

    request: GenerationRequest
    future: Future[GenerationResult]
    spec: SamplingSpec
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    max_new: int = 0
    n: int = 1
    generator: torch.Generator | None = None
    tokens: list[list[int]] = dataclasses.field(default_factory=list)
    reasons: list[FinishReason | None] = dataclasses.field(default_factory=list)
    prompt_text: str = ""
    started: bool = False
    aborted: bool = False
    tokenized: bool = False
    constraint: Constraint | None = None  # structured output: one matcher per row
    positions: list[list[TokenLogprob]] = dataclasses.field(default_factory=list)
    error: GenerationError | None = None  # this request failed; the batch goes on
    rendered: str | None = None  # a chat request's prompt, from the chat template

    @property
    def wants_logprobs(self) -> bool:
        """Whether the request asked for per-token log-probabilities."""
        return self.request.params.logprobs

    @property
    def cost(self) -> int:
        """Tokens this request may hold in the cache: its share of max_tokens_in_flight."""
        return self.n * (len(self.prompt_ids) + self.max_new)

    @property
    def done(self) -> bool:
        """Every row finished (or the request was aborted or failed)."""
        return self.aborted or self.error is not None or all(r is not None for r in self.reasons)

    def fail(self, error: GenerationError) -> None:
        """End this request with ``error`` at the next retirement; its rows stop now."""
        self.error = error
        self.reasons = [r or "stop" for r in self.reasons]

    def start(self, generator: torch.Generator | None) -> None:
        """Reset the per-row state when the request joins the batch."""
        self.tokens = [[] for _ in range(self.n)]
        self.reasons = [None] * self.n
        self.positions = [[] for _ in range(self.n)]
        self.generator = generator
        self.started = True

    def history(self, pad_id: int) -> torch.Tensor:
        """``[n, length]`` prompt + generated ids; finished rows are padded as generate does."""
        longest = max(len(t) for t in self.tokens)
        return torch.tensor(
            [self.prompt_ids + t + [pad_id] * (longest - len(t)) for t in self.tokens],
            dtype=torch.long,
        )

    def add_token(self, row: int, token: int, eos_ids: frozenset[int], tokenizer: Any) -> None:
        """Record a row's new token and decide whether the row is finished."""
        if self.reasons[row] is not None:
            return
        tokens = self.tokens[row]
        tokens.append(token)
        if self.constraint is not None:
            try:
                self.constraint.consume(row, token)
            except GenerationError as exc:
                self.fail(exc)
                return
        if token in eos_ids:
            self.reasons[row] = "eos"
        elif self.constraint is not None and self.constraint.finished(row):
            self.reasons[row] = "stop"  # the grammar is complete and allows nothing more
        elif self.request.params.stop and self._tail_has_stop(tokens, tokenizer):
            self.reasons[row] = "stop"
        elif len(tokens) >= self.max_new:
            self.reasons[row] = "length"

    def _tail_has_stop(self, tokens: list[int], tokenizer: Any) -> bool:
        stops = self.request.params.stop
        # A stop string completed by the newest token lies within the last
        # len(stop) tokens (each token is at least one character), plus slack.
        tail_len = max(len(s) for s in stops) + 2
        context = (self.prompt_ids + tokens)[-(tail_len + _TAIL_CONTEXT) : -tail_len]
        if len(tokens) <= tail_len:
            context = self.prompt_ids[-_TAIL_CONTEXT:]
        head = tokenizer.decode(context, skip_special_tokens=True)
        text = tokenizer.decode(context + tokens[-tail_len:], skip_special_tokens=True)
        tail = strip_prefix(text, head)
        return any(s in tail for s in stops)

    def output_text(self, row: int, tokenizer: Any) -> tuple[str, bool]:
        """Row ``row``'s continuation and whether a stop string cut it."""
        full = tokenizer.decode(self.prompt_ids + self.tokens[row], skip_special_tokens=True)
        text = strip_prefix(full, self.prompt_text)
        return cut_at_stop(text, self.request.params.stop)

    def result(self, tokenizer: Any, eos_ids: frozenset[int] = frozenset()) -> GenerationResult:
        """The result of the rows as they stand (complete, or partial when aborted)."""
        if not self.started:  # aborted while waiting: nothing was generated
            return GenerationResult(
                outputs=[""] * self.n,
                finish_reasons=["length"] * self.n,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=0,
                aborted=self.aborted,
            )
        outputs: list[str] = []
        reasons: list[FinishReason] = []
        for row in range(len(self.tokens)):
            text, stopped = self.output_text(row, tokenizer)
            outputs.append(text)
            reason = self.reasons[row]
            # "length" for an aborted row: it ended on a limit, just not its own.
            reasons.append("stop" if stopped else (reason or "length"))
        logprobs = None
        if self.wants_logprobs:
            logprobs = [to_entries(tokenizer, p, eos_ids) for p in self.positions]
        return GenerationResult(
            outputs=outputs,
            finish_reasons=reasons,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=sum(len(t) for t in self.tokens),
            aborted=self.aborted,
            logprobs=logprobs,
            prompt=self.rendered,
        )


# A request and the rows of the batch (or of a prefill mini-batch) it owns.
Placed = list[tuple[RequestState, list[int]]]


def constrain_rows(logits: torch.Tensor, placed: Placed) -> torch.Tensor:
    """``logits`` with each constrained row's disallowed tokens at ``-inf``.

    The same tensor when no row is constrained (free batches pay nothing). The masks
    of all constrained rows are filled into one bitmask and applied in one operation;
    a request whose matcher fails is failed alone, its rows left as they were.
    """
    constrained = [(s, r) for s, r in placed if s.constraint is not None and not s.done]
    if not constrained:
        return logits
    first = constrained[0][0].constraint
    assert first is not None
    rows = [row for _, r in constrained for row in r]
    bitmask = torch.zeros((len(rows), first.words), dtype=torch.int32)
    start = 0
    for state, state_rows in constrained:
        assert state.constraint is not None
        try:
            state.constraint.fill(bitmask, start)
        except GenerationError as exc:
            state.fail(exc)
            bitmask[start : start + len(state_rows)] = -1  # all allowed: the row is ignored
        start += len(state_rows)
    allowed = unpack_bitmask(bitmask, logits.shape[-1]).to(logits.device)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    masked = logits.clone()
    masked[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return masked


def note_logprobs(raw: torch.Tensor, chosen: torch.Tensor, placed: Placed) -> None:
    """Record the chosen tokens' log-probabilities for the requests that asked."""
    for state, rows in placed:
        if not state.wants_logprobs or state.done:
            continue
        index = torch.tensor(rows, dtype=torch.long, device=raw.device)
        top = state.request.params.top_logprobs
        for i, position in enumerate(position_logprobs(raw[index], chosen[index], top)):
            if state.reasons[i] is None:
                state.positions[i].append(position)


def prefill_groups(states: list[RequestState], forward_cost: int) -> list[list[RequestState]]:
    """Split newcomers into prefill mini-batches, shortest prompts first, minimising
    padded prompt tokens (rows times the longest prompt) plus ``forward_cost`` per batch.

    One left-padded batch of prompts 8 to 200 tokens long is about half padding; the
    split is exact (a dynamic programme over the sorted lengths; a few dozen requests).
    """
    ordered = sorted(states, key=lambda s: len(s.prompt_ids))
    best = [0] + [-1] * len(ordered)  # best[j]: cost of prefilling ordered[:j]
    cut = [0] * (len(ordered) + 1)
    for j in range(1, len(ordered) + 1):
        width, rows = len(ordered[j - 1].prompt_ids), 0
        for i in range(j - 1, -1, -1):
            rows += ordered[i].n
            cost = best[i] + rows * width + forward_cost
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[RequestState]] = []
    j = len(ordered)
    while j:
        groups.append(ordered[cut[j] : j])
        j = cut[j]
    return groups[::-1]

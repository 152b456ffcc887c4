"""The state of one request inside the batching engine, and how its text is made.

A request owns ``n`` rows of the running batch (``num_return_sequences``, or
``num_beams`` for beam search); its rows join together and leave together, so a
sampling request draws from its own generator on an ``[n, vocab]`` slice exactly as
``generate`` would, and a beam request reorders only its own rows.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import torch

from worker.engine.base import FinishReason, GenerationError, GenerationRequest, GenerationResult
from worker.engine.beam import BeamSearch
from worker.engine.constrained import Constraint
from worker.engine.logprobs import TokenLogprob, to_entries
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


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a row: the model's generation config's, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def tail_has_stop(
    prompt_ids: list[int], tokens: list[int], stops: list[str], tokenizer: Any
) -> bool:
    """Whether the newest token completed one of ``stops``: only the decoded tail is
    looked at (a bounded cost per token, whatever the vocabulary or the stop strings)."""
    # A stop string completed by the newest token lies within the last
    # len(stop) tokens (each token is at least one character), plus slack.
    tail_len = max(len(s) for s in stops) + 2
    context = (prompt_ids + tokens)[-(tail_len + _TAIL_CONTEXT) : -tail_len]
    if len(tokens) <= tail_len:
        context = prompt_ids[-_TAIL_CONTEXT:]
    head = tokenizer.decode(context, skip_special_tokens=True)
    text = tokenizer.decode(context + tokens[-tail_len:], skip_special_tokens=True)
    tail = strip_prefix(text, head)
    return any(s in tail for s in stops)


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
    beam: BeamSearch | None = None
    error: GenerationError | None = None  # set when this request alone failed
    restarts: int = 0  # times it was taken out of the batch to retry (unattributed errors)
    passed_over: int = 0  # times later requests were admitted while it did not fit
    constraint: Constraint | None = None  # structured output: one matcher per row
    positions: list[list[TokenLogprob]] = dataclasses.field(default_factory=list)
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
        """Every row finished (or the request was aborted, or failed)."""
        if self.aborted or self.error is not None:
            return True
        if self.beam is not None:
            return self.beam.done
        return all(r is not None for r in self.reasons)

    def tokenize(
        self, tokenizer: Any, context: int, max_rows: int, max_tokens: int
    ) -> GenerationError | None:
        """Tokenize and size the request; the error that keeps it from running, if any."""
        params = self.request.params
        if self.rendered is not None:  # the chat template wrote any BOS itself
            self.prompt_ids = tokenizer(self.rendered, add_special_tokens=False)["input_ids"]
        else:
            self.prompt_ids = tokenizer(self.request.prompt)["input_ids"]
        self.prompt_text = tokenizer.decode(self.prompt_ids, skip_special_tokens=True)
        self.tokenized = True
        length = len(self.prompt_ids)
        if length == 0:
            return GenerationError("empty_prompt", "the prompt has no tokens")
        if length >= context:
            message = f"the prompt has {length} tokens; the model's context is {context} tokens"
            return GenerationError("prompt_too_long", message)
        if params.max_new_tokens is not None:
            wanted = params.max_new_tokens
        else:  # max_length, as generate counts it: at least one new token
            wanted = max(1, (params.max_length or 0) - length)
        self.max_new = min(wanted, context - length)
        if self.n > max_rows or self.cost > max_tokens:
            message = (
                f"the request needs {self.n} rows and {self.cost} tokens of cache; this"
                f" worker holds {max_rows} rows and {max_tokens} tokens"
            )
            return GenerationError("request_too_large", message)
        return None

    def start(
        self, generator: torch.Generator | None, eos_ids: frozenset[int], tokenizer: Any
    ) -> None:
        """Reset the per-row state when the request joins the batch (again)."""
        self.tokens = [[] for _ in range(self.n)]
        self.reasons = [None] * self.n
        self.positions = [[] for _ in range(self.n)]
        self.generator = generator
        self.error = None
        self.beam = None
        if self.request.params.uses_beams:
            self.beam = BeamSearch(
                self.request.params,
                self.prompt_ids,
                self.max_new,
                eos_ids,
                generator,
                lambda tokens: self.stop_hit(tokens, tokenizer),
            )
            self.tokens = [[]]
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
            self.constraint.consume(row, token)  # raises for this request alone
        if token in eos_ids:
            self.reasons[row] = "eos"
        elif self.constraint is not None and self.constraint.finished(row):
            self.reasons[row] = "stop"  # the grammar is complete and allows nothing more
        elif self.stop_hit(tokens, tokenizer):
            self.reasons[row] = "stop"
        elif len(tokens) >= self.max_new:
            self.reasons[row] = "length"

    def stop_hit(self, tokens: list[int], tokenizer: Any) -> bool:
        """Whether ``tokens`` (generated so far) just completed a stop string."""
        stops = self.request.params.stop
        return bool(stops) and tail_has_stop(self.prompt_ids, tokens, stops, tokenizer)

    def text_of(self, tokens: list[int], tokenizer: Any) -> tuple[str, bool]:
        """The continuation made of ``tokens`` and whether a stop string cut it."""
        full = tokenizer.decode(self.prompt_ids + tokens, skip_special_tokens=True)
        text = strip_prefix(full, self.prompt_text)
        return cut_at_stop(text, self.request.params.stop)

    def output_text(self, row: int, tokenizer: Any) -> tuple[str, bool]:
        """Row ``row``'s continuation and whether a stop string cut it."""
        return self.text_of(self.tokens[row], tokenizer)

    def progress(self, tokenizer: Any) -> tuple[int, str]:
        """Tokens so far over all sequences, and the text of sequence 0 (for beams, the
        best running beam)."""
        tokens = [list(t) for t in self.tokens]  # a snapshot: the scheduler appends
        if not tokens:
            return 0, ""
        text, _ = self.text_of(tokens[0], tokenizer)
        return sum(len(t) for t in tokens), text

    def result(self, tokenizer: Any, eos_ids: frozenset[int] = frozenset()) -> GenerationResult:
        """The result of the rows as they stand (complete, or partial when aborted)."""
        if self.beam is not None and self.started:
            return self.beam.result(lambda t: self.text_of(t, tokenizer), self.aborted)
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
        return GenerationResult(
            outputs=outputs,
            finish_reasons=reasons,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=sum(len(t) for t in self.tokens),
            aborted=self.aborted,
            logprobs=[to_entries(tokenizer, p, eos_ids) for p in self.positions]
            if self.wants_logprobs
            else None,
            prompt=self.rendered,
        )


def prefill_groups(
    states: list[RequestState], forward_cost: int, max_tokens: int | None = None
) -> list[list[RequestState]]:
    """Split newcomers into prefill mini-batches of similar prompt lengths, minimising
    padded prompt tokens (one row per request times the longest prompt) plus
    ``forward_cost`` per batch, each batch at most ``max_tokens`` padded tokens (or one
    request).

    One left-padded batch of prompts 8 to 200 tokens long is about half padding; the
    split is exact (a dynamic programme over the sorted lengths; a few dozen requests).

    The longest prompts come first: each later mini-batch is then no wider than the
    slot cache's window, so it is copied into the running batch as it is, where in the
    other order each wider one made the cache copy every row it held to widen
    (:meth:`~worker.engine.kvcache.SlotCache.admit`).
    """
    ordered = sorted(states, key=lambda s: len(s.prompt_ids))
    best = [0] + [-1] * len(ordered)  # best[j]: cost of prefilling ordered[:j]
    cut = [0] * (len(ordered) + 1)
    for j in range(1, len(ordered) + 1):
        width = len(ordered[j - 1].prompt_ids)
        for i in range(j - 1, -1, -1):
            rows = j - i
            if rows > 1 and max_tokens is not None and rows * width > max_tokens:
                break
            cost = best[i] + rows * width + forward_cost
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[RequestState]] = []
    j = len(ordered)
    while j:
        groups.append(ordered[cut[j] : j])
        j = cut[j]
    return groups  # the longest first

"""Continuous batching over the KV cache, for any transformers causal LM.

A daemon scheduler thread owns the model. Each iteration it (1) admits waiting
requests FIFO within ``max_batch_size`` rows and ``max_tokens_in_flight`` tokens,
prefilling them as one left-padded mini-batch whose keys and values are copied
into free slots of the running cache (:class:`~worker.engine.kvcache.SlotCache`),
or runs one beam-search request on its own; (2) runs one decode step for every
row; (3) retires finished requests, which only frees their slots (when nothing waits
to fill them, the last rows move into them). Left padding is
exact because every forward gets the attention mask and explicit position ids
(real tokens so far), for absolute (GPT-2) and rotary (Llama) positions alike.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import logging
import threading
from concurrent.futures import Future
from typing import Any

import torch
from transformers import DynamicCache

from worker.engine import kvcache
from worker.engine.base import GenerationError, GenerationRequest, GenerationResult, ModelInfo
from worker.engine.base import Progress as ProgressT
from worker.engine.beam import run_beam_search
from worker.engine.chat import render_chat
from worker.engine.constrained import GrammarCompiler
from worker.engine.requests import (
    Placed,
    RequestState,
    constrain_rows,
    cut_at_stop,
    note_logprobs,
    prefill_groups,
    strip_prefix,
)
from worker.engine.sampling import SamplingSpec, choose_tokens, make_generator

log = logging.getLogger(__name__)

# Compact the running batch once this share of its rows are free slots and nothing
# waits to take them. Compaction copies only the rows it moves, each about what one
# decode step of a row costs, while a free row costs that at every step: compact at once.
COMPACT_FREE_SHARE = 0.0

# What one prefill forward costs beyond its tokens, in prompt tokens (call overhead,
# smaller matrix products). Newcomers of very different lengths are prefilled in
# groups of similar length when that saves more padding than this per extra forward.
PREFILL_FORWARD_COST = 64


def _logits_width(model: Any) -> int:
    """The vocabulary the logits cover (may exceed the tokenizer's: padded embeddings)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class BatchingEngine:
    """The :class:`~worker.engine.base.Engine` that batches requests continuously.

    ``model`` and ``tokenizer`` come from :func:`worker.engine.loader.load_model`
    (left padding, a pad token). The limits are those of
    :class:`core.settings.Settings` of the same names.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: ModelInfo,
        *,
        max_batch_size: int = 64,
        max_tokens_in_flight: int = 65_536,
        default_max_new_tokens: int = 50,
    ) -> None:
        self.info = info
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight
        self.default_max_new_tokens = default_max_new_tokens
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._grammar = GrammarCompiler(tokenizer, _logits_width(model), self.eos_ids)
        forward = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache; accept both.
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._lock = threading.Condition()
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._states: dict[str, RequestState] = {}
        self._accepting = True
        self._closing = False
        self._dead: BaseException | None = None
        # Running batch, touched only by the scheduler thread.
        self._jobs: list[RequestState] = []  # in admission order
        self._slots: dict[RequestState, list[int]] = {}  # each job's .n rows of the batch
        self._batch = kvcache.SlotCache(model.config, max_batch_size)
        self._thread = threading.Thread(target=self._run, name="genq-engine", daemon=True)
        self._thread.start()

    # ---- the Engine protocol (any thread) ----

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue ``request``; the future resolves to its result or a GenerationError."""
        future: Future[GenerationResult] = Future()
        params = request.params.with_defaults(self.default_max_new_tokens)
        n = params.num_return_sequences if not params.uses_beams else 1
        state = RequestState(
            request=dataclasses.replace(request, params=params),
            future=future,
            spec=SamplingSpec.from_params(params),
            n=n,
        )
        with self._lock:
            if not self._accepting:
                future.set_exception(GenerationError("engine_stopped", "the engine is not running"))
            elif request.id in self._states:
                future.set_exception(
                    GenerationError("duplicate_id", f"request {request.id!r} is already in flight")
                )
            else:
                self._states[request.id] = state
                self._waiting.append(state)
                self._lock.notify()
        return future

    def abort(self, request_id: str) -> None:
        """Stop a request; a waiting one resolves at once, a running one within a step."""
        with self._lock:
            state = self._states.get(request_id)
            if state is None:
                return
            state.aborted = True
            if not state.started and state in self._waiting:
                self._waiting.remove(state)
                self._finish(state, state.result(self.tokenizer))

    def progress(self, request_id: str) -> ProgressT | None:
        """Tokens so far over all sequences and the text of sequence 0 (decoded now)."""
        state = self._states.get(request_id)
        if state is None or not state.started:
            return None
        tokens = [list(t) for t in state.tokens]  # a snapshot: the scheduler appends
        if not tokens:
            return ProgressT(tokens=0, text="")
        full = self.tokenizer.decode(state.prompt_ids + tokens[0], skip_special_tokens=True)
        text, _ = cut_at_stop(strip_prefix(full, state.prompt_text), state.request.params.stop)
        return ProgressT(tokens=sum(len(t) for t in tokens), text=text)

    def check_health(self) -> bool:
        """Whether the scheduler thread is alive and accepting requests."""
        return self._thread.is_alive() and self._accepting and self._dead is None

    def close(self) -> None:
        """Stop the scheduler; every waiting and running request fails."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout=60)
        self._fail_all(GenerationError("engine_stopped", "the engine was closed"))

    # ---- the scheduler thread ----

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._closing:
                    self._iteration()
        except BaseException as exc:  # the thread must never die silently
            log.exception("engine scheduler died")
            self._dead = exc
            self._fail_all(GenerationError("engine_failed", f"the engine scheduler died: {exc!r}"))
        else:
            self._fail_all(GenerationError("engine_stopped", "the engine was closed"))

    def _iteration(self) -> None:
        newcomers, beam = self._admit()
        if beam is not None:
            self._guarded([beam], lambda: self._run_beam(beam))
        if newcomers:
            for group in prefill_groups(newcomers, PREFILL_FORWARD_COST):
                self._guarded(group, functools.partial(self._prefill, group))
            self._retire()
        if self._jobs:
            self._guarded(list(self._jobs), self._decode)
            self._retire()

    def _run_beam(self, state: RequestState) -> None:
        result = run_beam_search(state, self.model, self.tokenizer, self.eos_ids, self.device)
        self._finish(state, result)

    def _guarded(self, states: list[RequestState], step: Any) -> None:
        """Run a model step; if it raises, fail the requests it concerned and go on."""
        try:
            step()
        except Exception as exc:
            log.exception("generation step failed")
            error = GenerationError("generation_failed", f"generation failed: {exc!r}")
            for state in states:
                self._fail(state, error)
            if any(s in self._jobs for s in states):
                self._reset_batch()

    def _admit(self) -> tuple[list[RequestState], RequestState | None]:
        """Pop the requests that fit, FIFO; or one beam request to run alone."""
        newcomers: list[RequestState] = []
        with self._lock:
            while not self._closing and not self._waiting and not self._jobs:
                self._lock.wait()
            rows = sum(s.n for s in self._jobs)
            tokens = sum(s.cost for s in self._jobs)
            while self._waiting and not self._closing:
                state = self._waiting[0]
                if not state.tokenized and not self._tokenize(state):
                    self._waiting.popleft()
                    continue
                empty = not self._jobs and not newcomers
                if state.request.params.uses_beams:
                    if empty:
                        self._waiting.popleft()
                        state.started = True
                        return [], state
                    break
                fits = rows + state.n <= self.max_batch_size
                fits = fits and tokens + state.cost <= self.max_tokens_in_flight
                if not (fits or empty):  # an oversized request still runs, alone
                    break
                self._waiting.popleft()
                seed = state.request.seed
                state.start(make_generator(seed, self.device) if state.spec.do_sample else None)
                newcomers.append(state)
                rows += state.n
                tokens += state.cost
        return newcomers, None

    def _tokenize(self, state: RequestState) -> bool:
        """Tokenize and size a request; fail it (and return False) if it cannot run."""
        params = state.request.params
        try:
            state.prompt_ids = self._prompt_ids(state)
        except GenerationError as exc:
            state.tokenized = True
            self._finish(state, exc)
            return False
        state.prompt_text = self.tokenizer.decode(state.prompt_ids, skip_special_tokens=True)
        state.tokenized = True
        length, context = len(state.prompt_ids), self.info.context_length
        if length == 0:
            self._finish(state, GenerationError("empty_prompt", "the prompt has no tokens"))
            return False
        if length >= context:
            self._finish(
                state,
                GenerationError(
                    "prompt_too_long",
                    f"the prompt has {length} tokens; the model's context is {context} tokens",
                ),
            )
            return False
        if params.max_new_tokens is not None:
            wanted = params.max_new_tokens
        else:  # max_length, as generate counts it: at least one new token
            wanted = max(1, (params.max_length or 0) - length)
        state.max_new = min(wanted, context - length)
        try:
            state.constraint = self._grammar.constraint_for(params, state.n)
        except GenerationError as exc:
            self._finish(state, exc)
            return False
        return True

    def _prompt_ids(self, state: RequestState) -> list[int]:
        """The prompt's tokens; a chat request's messages rendered by the chat template
        (which writes any BOS itself, so no special tokens are added again)."""
        messages = state.request.messages
        if messages is None:
            ids: list[int] = self.tokenizer(state.request.prompt)["input_ids"]
            return ids
        if not self.info.chat_template:
            raise GenerationError(
                "model_without_chat_template",
                f"model {self.info.name!r} has no chat template: send a prompt instead",
            )
        state.rendered = render_chat(self.tokenizer, messages)
        chat_ids: list[int] = self.tokenizer(state.rendered, add_special_tokens=False)["input_ids"]
        return chat_ids

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Last-position logits in float32 (as generate computes them); ``cache`` grows."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: cache},
            **self._keep_last,
        )
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _prefill(self, newcomers: list[RequestState]) -> None:
        """Prefill the newcomers as their own mini-batch, then copy them into free slots."""
        prompts = [s.prompt_ids for s in newcomers for _ in range(s.n)]
        width = max(len(p) for p in prompts)
        ids = torch.tensor(
            [[self.pad_id] * (width - len(p)) + p for p in prompts],
            dtype=torch.long,
            device=self.device,
        )
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts],
            dtype=torch.long,
            device=self.device,
        )
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        placed = self._placed_consecutively(newcomers)
        chosen = self._choose(logits, placed)
        self._record(chosen, placed)
        try:
            rows = self._batch.admit(cache, mask, chosen)
        except Exception:
            self._reset_batch()  # a half-done admission leaves the slots in no known state
            raise
        for state, local in placed:
            self._slots[state] = [rows[i] for i in local]
        self._jobs.extend(newcomers)

    @staticmethod
    def _placed_consecutively(states: list[RequestState]) -> Placed:
        """The rows of a prefill mini-batch: each request's .n rows, one after another."""
        placed: Placed = []
        start = 0
        for state in states:
            placed.append((state, list(range(start, start + state.n))))
            start += state.n
        return placed

    def _decode(self) -> None:
        """One token for every row of the running batch (free slots too: no copy to skip them)."""
        ids, mask, positions = self._batch.step_inputs()
        logits = self._forward(ids, mask, positions, self._batch.cache)
        placed = [(state, self._slots[state]) for state in self._jobs]
        chosen = self._choose(logits, placed)
        self._batch.advance(chosen)
        self._record(chosen, placed)

    def _choose(self, logits: torch.Tensor, placed: Placed) -> torch.Tensor:
        """Next tokens for every row: one argmax for the batch, then per request.

        Constrained rows are masked first; log-probabilities come from the raw logits.
        """
        raw, logits = logits, constrain_rows(logits, placed)
        chosen = torch.argmax(logits, dim=-1)
        for state, rows in placed:
            if not state.spec.plain_greedy:
                index = torch.tensor(rows, dtype=torch.long, device=logits.device)
                history = state.history(self.pad_id) if state.spec.needs_history else None
                chosen[index] = choose_tokens(logits[index], history, state.spec, state.generator)
        note_logprobs(raw, chosen, placed)
        return chosen

    def _record(self, chosen: torch.Tensor, placed: Placed) -> None:
        tokens = chosen.tolist()
        for state, rows in placed:
            for i, row in enumerate(rows):
                state.add_token(i, tokens[row], self.eos_ids, self.tokenizer)

    def _retire(self) -> None:
        """Resolve finished or aborted requests and free their slots (no copy)."""
        freed: list[int] = []
        remaining: list[RequestState] = []
        for state in self._jobs:
            if state.done:
                self._finish(state, state.error or state.result(self.tokenizer, self.eos_ids))
                freed.extend(self._slots.pop(state))
            else:
                remaining.append(state)
        if not freed:
            return
        self._jobs = remaining
        self._batch.retire(freed)
        free = self._batch.free_rows
        if remaining and free and free >= COMPACT_FREE_SHARE * self._batch.rows:
            with self._lock:
                waiting = bool(self._waiting)
            if not waiting:
                self._compact()

    def _compact(self) -> None:
        """Close the free slots (the tail of a workload: nothing will take them)."""
        moved = self._batch.compact()
        for state, rows in self._slots.items():
            self._slots[state] = [moved.get(row, row) for row in rows]

    def _reset_batch(self) -> None:
        for state in self._jobs:
            self._fail(state, GenerationError("generation_failed", "the batch was reset"))
        self._jobs = []
        self._slots.clear()
        self._batch.clear()

    # ---- futures ----

    def _finish(self, state: RequestState, outcome: GenerationResult | BaseException) -> None:
        with self._lock:
            self._states.pop(state.request.id, None)
        if state.future.done():
            return
        if isinstance(outcome, BaseException):
            state.future.set_exception(outcome)
        else:
            state.future.set_result(outcome)

    def _fail(self, state: RequestState, error: GenerationError) -> None:
        self._finish(state, error)

    def _fail_all(self, error: GenerationError) -> None:
        with self._lock:
            self._accepting = False
            states = list(self._states.values())
            self._waiting.clear()
        for state in states:
            self._fail(state, error)

"""Continuous batching over the KV cache, for any transformers causal LM.

A daemon scheduler thread owns the model. Each iteration it (1) admits waiting
requests FIFO within ``max_batch_size`` rows and ``max_tokens_in_flight`` tokens
(about ``admission.PREFILL_TOKENS`` prompt tokens per iteration), prefilling them as
left-padded mini-batches of about ``PREFILL_GROUP_TOKENS`` (a request's prompt once,
however many rows it has) whose keys and values are copied into free slots of the
running cache (:class:`~worker.engine.kvcache.SlotCache`);
(2) runs one decode step for every row, greedy, sampled and beam rows alike (a beam
request owns ``num_beams`` rows and reorders them after each step,
:mod:`worker.engine.beam`); (3) retires finished requests, which only frees their
slots (when nothing waits to fill them, the last rows move into them). Short requests
that arrive while the batch is busy run in an express lane of their own, which gets a
turn before each of the batch's forwards (:mod:`worker.engine.lanes`). Left padding
is exact because every forward gets the attention mask and explicit position ids
(real tokens so far), for absolute (GPT-2) and rotary (Llama) positions alike.

Faults stay with their request: an exception while choosing one request's tokens
(non-finite scores, a stop-string check) fails that request alone. An error that
belongs to no request (a forward running out of memory) takes the newest half of the
running requests out of the batch to start again later, and a request taken out
``MAX_RESTARTS`` times goes back to the worker's queue (:data:`~worker.engine.base.REQUEUE`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import torch
from transformers import DynamicCache

from core.express import EXPRESS_ROWS
from worker.engine import admission, fastpath, kvcache, lanes, layerhooks
from worker.engine.base import (
    REQUEUE,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
)
from worker.engine.base import Progress as ProgressT
from worker.engine.chat import render_chat
from worker.engine.choosing import (
    Moves,
    choose,
    error_of,
    is_memory_error,
    placed_consecutively,
    record,
)
from worker.engine.constrained import GrammarCompiler, logits_width
from worker.engine.cores import IdleCores
from worker.engine.fastpath import DecodeStep, routing
from worker.engine.fastpath.attention import whole_rows_for
from worker.engine.fastpath.compiled import CompiledAttention
from worker.engine.lanes import Lane
from worker.engine.requests import RequestState, eos_ids, prefill_groups
from worker.engine.sampling import SamplingSpec, make_generator

log = logging.getLogger(__name__)

# What one prefill forward costs beyond its tokens, in prompt tokens (call overhead,
# smaller matrix products). Newcomers of very different lengths are prefilled in
# groups of similar length when that saves more padding than this per extra forward.
PREFILL_FORWARD_COST = 64
# Padded prompt tokens of one prefill forward (one request at least). Larger forwards
# use the matrix kernels better (GPT-2 124M on 2 cores, prompts of 25 tokens: bf16
# 1,181 tokens/s at 125 a forward, 1,539 at 500, 1,536 at 1,000; fp32 464, 696, 791).
# The first short jobs to arrive during a forward get their express turn between two
# of its layers; one arriving after that turn waits for the forward's end.
PREFILL_GROUP_TOKENS = 512

# Times a request may be taken out of the batch and started again after errors that
# are not its own, before it is handed back to the worker's queue.
MAX_RESTARTS = 2


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
        fast_decode: bool = True,
        express_max_new_tokens: int = 16,
        threads: int | None = None,
        share_cores: bool = False,
        compile_attention: bool = False,
        pack_fp32: bool = True,
    ) -> None:
        # torch threads of the scheduler thread (None: torch's count for new threads).
        self.threads = threads
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight
        # Close free slots as soon as nothing waits to take them: compaction copies only
        # the rows it moves (about one decode step of each), while a free row costs that
        # at every step. Tests turn it off to keep rows where they are.
        self.compact_free_slots = True
        self.default_max_new_tokens = default_max_new_tokens
        # Short requests (at most this many new tokens; 0: none) skip a busy main batch.
        self.express_max_new_tokens = express_max_new_tokens
        self.device = next(model.parameters()).device
        # Fewer threads while other processes hold cores (worker.engine.cores).
        self._cores = (
            IdleCores(threads)
            if share_cores and threads and threads > 1 and self.device.type == "cpu"
            else None
        )
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._grammar = GrammarCompiler(tokenizer, logits_width(model), self.eos_ids)
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
        # The running batches, touched only by the scheduler thread (worker.engine.lanes).
        main = kvcache.SlotCache(model.config, max_batch_size)
        express = kvcache.SlotCache(model.config, EXPRESS_ROWS)
        # A decode step written for the model's family (None: the model's own forward);
        # not even built without fast_decode (it packs weights).
        fast = (
            fastpath.decode_step_for(model, main, max_rows=max_batch_size, pack_fp32=pack_fp32)
            if fast_decode
            else None
        )
        products = "packed" if fast is not None and fast.packed else "model"
        self.info = dataclasses.replace(info, products=products)
        self._main = Lane(main, fast)
        self._express = Lane(express, fastpath.rebind(fast, express) if fast else None)
        self._lanes = (self._express, self._main)
        # Set by submit when a request that may take the express lane arrives; the
        # main lane's decode step looks at it between layers (_between_layers).
        self._short_arrived = False
        self._nested_turn_free = True
        if fast is not None:
            fast.between_layers = self._between_layers
        # bf16/fp16 attention on a CPU compiled (on threads of its own, started with
        # the scheduler); the eager products until it is ready.
        self.compiled_attention = (
            self._compiled_attention(fast) if compile_attention and fast is not None else None
        )
        # The same turn inside the main lane's forwards through the model's own layers
        # (prefills; decode steps of models without a fast step): set while one runs.
        self._turns_in_model = False
        self._layer_hooks = layerhooks.call_between_layers(model, self._between_model_layers)
        # Requests admitted to the main lane whose prefill is still to come (an iteration
        # prefills a group at a time, with express turns between): their cache tokens are
        # promised, and an iteration that fails before their prefill starts them again.
        self._unplaced: list[RequestState] = []
        self._thread = threading.Thread(target=self._run, name="genq-engine", daemon=True)
        # The scheduler's forwards through the model (prefills) use the fast step's
        # packed weights too, where it has any (on a CPU: bf16/fp16, and fp32 with
        # pack_fp32).
        self._unroute = routing.route(
            fast.packed_modules() if fast is not None else [],
            lambda: threading.current_thread() is self._thread,
        )
        try:
            self._thread.start()
        except BaseException:  # no engine to close: leave the model as it was
            self._unroute()
            for hook in self._layer_hooks:
                hook.remove()
            raise
        if self.compiled_attention is not None:
            self.compiled_attention.start(self.threads)

    def _compiled_attention(self, fast: DecodeStep) -> CompiledAttention | None:
        """Both lanes' steps attending through one :class:`CompiledAttention`, where
        they attend over whole rows (bf16/fp16 on a CPU); None elsewhere."""
        dtype = next(self.model.parameters()).dtype
        if not whole_rows_for(self.device, dtype):
            return None
        attention = CompiledAttention(
            heads=fast.heads,
            kv_heads=fast.kv_heads,
            dim=fast.head_dim,
            dtype=dtype,
            scale=fast.scale,
        )
        for lane in self._lanes:
            if lane.fast is not None:
                lane.fast.products = attention
        return attention

    # ---- the Engine protocol (any thread) ----

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue ``request``; the future resolves to its result or a GenerationError."""
        future: Future[GenerationResult] = Future()
        params = request.params.with_defaults(self.default_max_new_tokens)
        n = params.num_beams if params.uses_beams else params.num_return_sequences
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
                if self._may_go_express(state):
                    self._short_arrived = True
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
        tokens, text = state.progress(self.tokenizer)
        return ProgressT(tokens=tokens, text=text, prompt_tokens=len(state.prompt_ids))

    def check_health(self) -> bool:
        """Whether the scheduler thread is alive and accepting requests."""
        return self._thread.is_alive() and self._accepting and self._dead is None

    def close(self) -> None:
        """Stop the scheduler; every waiting and running request fails."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout=60)
        if self.compiled_attention is not None:
            self.compiled_attention.close()
        self._fail_all(GenerationError("engine_stopped", "the engine was closed"))
        for hook in self._layer_hooks:
            hook.remove()
        self._unroute()

    # ---- the scheduler thread ----

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                while not self._closing:
                    try:
                        self._iteration()
                    except Exception:  # a scheduler bug must not end every job for good
                        log.exception("engine iteration failed; restarting the running batch")
                        unplaced, self._unplaced = self._unplaced, []
                        self._requeue(unplaced)
                        for lane in self._lanes:
                            self._restart(lane, list(lane.jobs))
        except BaseException as exc:  # the thread must never die silently
            log.exception("engine scheduler died")
            self._dead = exc
            self._fail_all(GenerationError("engine_failed", f"the engine scheduler died: {exc!r}"))
        else:
            self._fail_all(GenerationError("engine_stopped", "the engine was closed"))

    def _iteration(self) -> None:
        """Admit, prefill the newcomers, and run one decode step of the main batch; short
        requests get an express turn before each of the main batch's forwards."""
        if not self._wait_for_work():
            return
        self._express_turn()
        newcomers = self._admit()
        if newcomers:
            self._unplaced = list(newcomers)
            for group in prefill_groups(newcomers, PREFILL_FORWARD_COST, PREFILL_GROUP_TOKENS):
                self._prefill_split(self._main, group)
                self._unplaced = [s for s in self._unplaced if s not in group]
                self._express_turn()
            self._retire(self._main)
        if self._main.jobs:
            self._step(self._main)

    def _express_turn(self, *, nested: bool = False) -> None:
        """Admit the short requests waiting (:func:`~worker.engine.lanes.express`) and run
        up to ``EXPRESS_STEPS_PER_TURN`` steps of the express lane. A turn between two
        forwards of the main batch allows one more inside the next (``nested``)."""
        if not self.express_max_new_tokens:
            return
        self._short_arrived = False  # whoever arrived is seen now
        self._nested_turn_free = not nested
        with self._lock:
            newcomers = admission.pick(
                self._waiting,
                (
                    EXPRESS_ROWS - self._express.rows,
                    self._tokens_left(),
                ),
                self._tokenize,
                eligible=lambda s: lanes.express(s, self.express_max_new_tokens),
            )
        for state in newcomers:
            self._start(state)
            log.info("request %s runs in the express lane", state.request.id)
        if newcomers:
            try:
                for group in prefill_groups(newcomers, PREFILL_FORWARD_COST, PREFILL_GROUP_TOKENS):
                    self._prefill_split(self._express, group)
            except Exception:  # a scheduler bug: those not in the lane yet start again
                self._requeue([s for s in newcomers if s not in self._express.slots])
                raise
            self._retire(self._express)
        for _ in range(lanes.EXPRESS_STEPS_PER_TURN):
            if not self._express.jobs:
                break
            self._step(self._express)

    def _may_go_express(self, state: RequestState) -> bool:
        """Whether ``state`` may take the express lane, before it is tokenized
        (:func:`~worker.engine.lanes.express` decides). A request asking for more new
        tokens than the lane takes does not wake it: a turn inside the main step would
        only give the lane's running requests more steps, the main batch waiting."""
        wanted = state.request.params.max_new_tokens
        return (
            bool(self.express_max_new_tokens)
            and state.request.priority != "low"
            and state.n <= EXPRESS_ROWS
            and (wanted is None or wanted <= self.express_max_new_tokens)
        )

    def _between_layers(self) -> None:
        """Between two layers of the main lane's decode step: a short request that
        arrived during the step gets its express turn now, not after the whole step
        (160 rows of GPT-2 take about 0.3 s a step on two cores); once a step at most,
        so the main batch waits for ``EXPRESS_STEPS_PER_TURN`` express steps at most.
        The express lane has its own slot cache: the main step goes on unchanged."""
        if not (self._short_arrived and self._nested_turn_free):
            return  # one turn inside a step at most: the main batch waits for it
        try:
            self._express_turn(nested=True)
        except Exception:  # a scheduler bug: the express lane's, not the main step's
            log.exception("express turn inside a main step failed; restarting the express lane")
            self._restart(self._express, list(self._express.jobs))

    def _between_model_layers(self) -> None:
        """After a decoder layer of the model's own forward: the express turn of
        :meth:`_between_layers` when the main lane's forward runs (no other), on the
        scheduler thread (not in a forward another thread runs on the same model)."""
        if self._turns_in_model and threading.current_thread() is self._thread:
            self._between_layers()

    @contextlib.contextmanager
    def _layer_turns(self, lane: Lane) -> Iterator[None]:
        """While ``lane``'s forward runs: turns between its layers if it is the main lane
        (an express forward nested inside one gets none)."""
        outer, self._turns_in_model = self._turns_in_model, lane is self._main
        try:
            yield
        finally:
            self._turns_in_model = outer

    def _step(self, lane: Lane) -> None:
        """One decode step of ``lane``, then retire whoever finished."""
        try:
            self._decode(lane)
        except Exception as exc:  # the forward of everyone: no request to blame yet
            self._unattributed(lane, exc)
        self._retire(lane)

    def _prefill_split(self, lane: Lane, group: list[RequestState]) -> None:
        """Prefill ``group``; if that fails, each half on its own, down to one request."""
        try:
            self._prefill(lane, group)
        except Exception as exc:
            log.warning("prefill of %d requests failed: %r", len(group), exc)
            for state in group:  # choosing may have begun: begin again
                self._start(state)
            if len(group) > 1:
                half = len(group) // 2
                self._prefill_split(lane, group[:half])
                self._prefill_split(lane, group[half:])
            else:
                self._blame(group[0], exc)

    def _unattributed(self, lane: Lane, exc: Exception) -> None:
        """A decode step failed: take the newest half of the batch out to start again
        later; a request alone in the batch is the cause."""
        log.warning("decode step over %d requests failed: %r", len(lane.jobs), exc)
        if len(lane.jobs) == 1:
            self._blame(lane.jobs[0], exc)
            return
        self._restart(lane, lane.jobs[len(lane.jobs) // 2 :])

    def _blame(self, state: RequestState, exc: Exception) -> None:
        """A request failed alone: its fault, unless memory ran out (then the queue's)."""
        if is_memory_error(exc):
            state.error = GenerationError(REQUEUE, f"out of memory even alone: {exc!r}")
        else:
            state.error = error_of(exc)
        if not any(state in lane.jobs for lane in self._lanes):
            self._finish(state, state.error)

    def _restart(self, lane: Lane, states: list[RequestState]) -> None:
        """Take ``states`` out of ``lane``; they start again from their prompt (same
        tokens: a sampling request's generator restarts from its seed)."""
        running = [s for s in states if s in lane.slots]
        freed = [row for s in running for row in lane.slots.pop(s)]
        lane.jobs = [s for s in lane.jobs if s not in set(states)]
        if not lane.jobs:
            lane.batch.clear()
        elif freed:
            lane.batch.retire(freed)
        self._requeue(states)

    def _requeue(self, states: list[RequestState]) -> None:
        """Put ``states`` (in no lane now) back at the head of the queue, or resolve those
        that are done or were restarted too often."""
        again: list[RequestState] = []
        for state in states:
            state.restarts += 1
            if state.started and state.done:  # aborted or failed by itself: resolve it
                self._finish(state, self._outcome(state))
            elif state.restarts > MAX_RESTARTS:
                message = "taken out of the batch too often by errors that were not its own"
                self._finish(state, GenerationError(REQUEUE, message))
            else:
                state.started, state.beam, state.error = False, None, None
                again.append(state)
        with self._lock:
            self._waiting.extendleft(reversed(again))

    def _wait_for_work(self) -> bool:
        """Sleep until a request waits or runs; False when the engine is closing."""
        with self._lock:
            while not self._closing and not self._waiting and not self.running:
                self._lock.wait()
            return not self._closing

    def _admit(self) -> list[RequestState]:
        """Pop the requests that fit the main batch
        (:func:`~worker.engine.admission.pick`) and start them."""
        with self._lock:
            room = (
                self.max_batch_size - self._main.rows,
                self._tokens_left(),
            )
            newcomers = admission.pick(self._waiting, room, self._tokenize)
        for state in newcomers:
            self._start(state)
        return newcomers

    def _tokens_left(self) -> int:
        """Cache tokens of max_tokens_in_flight not held by a lane's requests nor
        promised to the admitted ones still to prefill."""
        held = self._main.tokens + self._express.tokens + sum(s.cost for s in self._unplaced)
        return self.max_tokens_in_flight - held

    @property
    def running(self) -> bool:
        """Whether any request is in a running batch."""
        return any(lane.jobs for lane in self._lanes)

    def _start(self, state: RequestState) -> None:
        """Ready a request to join the batch; whatever goes wrong is its own error
        (it leaves the batch with it), never an exception that strands its future."""
        try:
            generator = (
                make_generator(state.request.seed, self.device) if state.spec.do_sample else None
            )
            state.start(generator, self.eos_ids, self.tokenizer)
            # A fresh matcher per (re)start: a restarted request starts over.
            state.constraint = self._grammar.constraint_for(state.request.params, state.n)
        except GenerationError as exc:
            state.error = exc
        except Exception as exc:
            log.exception("request %s could not start", state.request.id)
            state.error = GenerationError("generation_failed", f"could not start: {exc!r}")

    def _tokenize(self, state: RequestState) -> bool:
        """Tokenize and size a request; fail it (and return False) if it cannot run."""
        try:
            if state.request.messages is not None:
                state.rendered = self._render(state.request.messages)
            error = state.tokenize(
                self.tokenizer,
                self.info.context_length,
                self.max_batch_size,
                self.max_tokens_in_flight,
            )
        except GenerationError as exc:
            error = exc
        except Exception as exc:
            log.exception("tokenizing request %s failed", state.request.id)
            error = GenerationError("tokenize_failed", f"tokenizing failed: {exc!r}")
        if error is not None:
            self._finish(state, error)
        return error is None

    def _render(self, messages: list[dict[str, str]]) -> str:
        """A chat request's prompt, from the model's own chat template."""
        if not self.info.chat_template:
            raise GenerationError(
                "model_without_chat_template",
                f"model {self.info.name!r} has no chat template: send a prompt instead",
            )
        return render_chat(self.tokenizer, messages)

    def _share_cores(self) -> None:
        """Run the next forward with the threads the other processes leave idle."""
        if self._cores is None:
            return
        try:
            threads = self._cores.threads()
        except Exception:  # never a forward's failure: keep the threads from here on
            log.exception("reading the idle CPUs failed; keeping %s torch threads", self.threads)
            self._cores, threads = None, self.threads or torch.get_num_threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Last-position logits in float32 (as generate computes them); ``cache`` grows."""
        self._share_cores()
        for lane in self._lanes:
            if lane.fast is not None and cache is lane.batch.cache:  # a decode step
                return lane.fast(ids, mask, positions)
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

    def _prefill(self, lane: Lane, newcomers: list[RequestState]) -> None:
        """Prefill the newcomers as their own mini-batch, then copy them into free slots.

        A request's ``n`` rows (beams, or sequences to return) share one prompt: it is
        computed once and its logits, keys and values are copied to the other rows."""
        prompts = [s.prompt_ids for s in newcomers]
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
        with self._layer_turns(lane):
            logits = self._forward(ids, mask, positions, cache)
        if any(s.n > 1 for s in newcomers):
            logits, mask = _expand_rows(newcomers, logits, mask, cache)
        placed = placed_consecutively(newcomers)
        chosen = choose(logits, placed, self.pad_id)
        record(chosen, placed, self.eos_ids, self.tokenizer)
        try:
            rows = lane.batch.admit(cache, mask, chosen)
        except Exception:
            # A half-done admission leaves the slots in no known state: start them again.
            self._restart(lane, list(lane.jobs))
            raise
        for state, local in placed:
            lane.slots[state] = [rows[i] for i in local]
        lane.jobs.extend(newcomers)

    def _decode(self, lane: Lane) -> None:
        """One token for every row of ``lane`` (free slots too: no copy to skip them)."""
        try:
            ids, mask, positions = lane.batch.step_inputs()
        except Exception:
            # A reallocation failed (out of memory) and emptied the cache: every request
            # of the lane starts again.
            self._restart(lane, list(lane.jobs))
            raise
        with self._layer_turns(lane):
            logits = self._forward(ids, mask, positions, lane.batch.cache)
        placed = [(state, lane.slots[state]) for state in lane.jobs]
        moves: Moves = []
        chosen = choose(logits, placed, self.pad_id, moves)
        lane.batch.advance(chosen)
        if moves:  # every beam request's rows in one gather per buffer (their rows are disjoint)
            targets = [row for own, _, _ in moves for row in own]
            sources = [source for _, own_sources, _ in moves for source in own_sources]
            lane.batch.reorder(targets, sources, newest=max(fed for _, _, fed in moves))
        record(chosen, placed, self.eos_ids, self.tokenizer)

    def _retire(self, lane: Lane) -> None:
        """Resolve finished or aborted requests and free their slots (no copy)."""
        freed: list[int] = []
        remaining: list[RequestState] = []
        for state in lane.jobs:
            if state.done:
                self._finish(state, self._outcome(state))
                freed.extend(lane.slots.pop(state))
            else:
                remaining.append(state)
        if not freed:
            return
        lane.jobs = remaining
        lane.batch.retire(freed)
        free = lane.batch.free_rows
        if remaining and free and self.compact_free_slots:
            with self._lock:
                waiting = bool(self._waiting)
            if not waiting:
                self._compact(lane)

    def _compact(self, lane: Lane) -> None:
        """Close the free slots (the tail of a workload: nothing will take them)."""
        moved = lane.batch.compact()
        for state, rows in lane.slots.items():
            lane.slots[state] = [moved.get(row, row) for row in rows]

    def _outcome(self, state: RequestState) -> GenerationResult | GenerationError:
        if state.error is not None:
            return state.error
        try:
            return state.result(self.tokenizer, self.eos_ids)
        except Exception as exc:  # decoding its text: this request's own
            log.exception("request %s: building its result failed", state.request.id)
            return error_of(exc)

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

    def _fail_all(self, error: GenerationError) -> None:
        with self._lock:
            self._accepting = False
            states = list(self._states.values())
            self._waiting.clear()
        for state in states:
            self._finish(state, error)


def _expand_rows(
    states: list[RequestState], logits: torch.Tensor, mask: torch.Tensor, cache: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each request's one prefilled row to all its ``n`` rows: logits, mask and
    ``cache`` (in place). ``generate`` computes the copies; they are the same numbers."""
    index = torch.tensor(
        [i for i, state in enumerate(states) for _ in range(state.n)], device=logits.device
    )
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
    return logits.index_select(0, index), mask.index_select(0, index)

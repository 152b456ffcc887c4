"""bf16/fp16 attention of the decode step compiled into a few loops (torch.compile).

On a CPU the step attends over whole cache rows with two batched products
(:func:`~worker.engine.fastpath.attention.products_attention`). Each (row, head) is a
product of one query with its own keys, so the batched kernels run thousands of tiny
products. :func:`fused_attention` computes the same as multiplications and sums, which
inductor compiles into loops that read each key and value once, vectorized: at 128
rows of GPT-2's shape, 2 threads, a layer's attention 1.35-1.6x as fast (bench/README.md,
"Issue 13, session 20"). Inductor is told to keep every rounding to bf16/fp16 the
products make (``emulate_precision_casts``), so the results are the products' to
within one rounding (the order of the sums differs); like any bf16 result they may
still part a greedy request's tokens from those it would get uncompiled.

Nothing is compiled on the engine's scheduler thread, where a compilation (seconds)
would stall every request:

- compiling happens on short-lived threads of their own (an OpenMP team that outlives
  its work would slow the scheduler's), one compilation at a time, one per torch thread
  count: inductor plans its loops for one count, and ``GENQ_SHARE_CORES`` changes the
  count between forwards. Until the code for the current count is ready, the products
  answer. Compiling holds the interpreter lock for long stretches, so the engine's
  steps run slower while it lasts (seconds);
- the inputs are given the layout the code was compiled for (the query is a strided
  view of the fused qkv product), and a single row, which torch would compile apart,
  goes to the products (a one-row step's attention is cheap);
- should a compilation start on any other thread all the same (a guard nobody foresaw),
  it fails at once and the products answer from then on, as they do where compiling or
  a compiled call fails (no C++ compiler, an unsupported platform) or where torch ran
  nothing compiled (``TORCH_COMPILE_DISABLE``). Each case is logged once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import types
from collections.abc import Sequence
from typing import Any

import torch

from worker.engine.fastpath.attention import Products, products_attention

log = logging.getLogger(__name__)

COMPILER_THREAD = "genq-compile"


def fused_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`products_attention`'s result written as products and sums (what inductor
    fuses): ``query`` ``[rows, heads, 1, dim]`` over whole rows of ``keys``/``values``
    ``[rows, kv_heads, width, dim]``, ``keep`` ``[rows, 1, 1, width]``.

    The same roundings as the products: the scaled query in the inputs' precision,
    sums in float32, scores rounded to the keys' precision before the float32
    softmax, weights rounded to the values' precision, the output to it.
    """
    rows, heads, _, dim = query.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    q = (query * scale).float().view(rows, kv_heads, group, 1, dim)
    scores = (q * keys.float().view(rows, kv_heads, 1, width, dim)).sum(-1)
    scores = scores.to(keys.dtype).float()  # [rows, kv_heads, group, width]
    weights = scores.masked_fill(~keep, float("-inf")).softmax(-1).to(values.dtype)
    out = (weights.float().unsqueeze(-1) * values.float().view(rows, kv_heads, 1, width, dim)).sum(
        -2
    )
    return out.to(values.dtype).view(rows, heads, 1, dim)


class CompiledAttention:
    """:func:`fused_attention` compiled for each torch thread count the scheduler runs
    with, and :func:`products_attention` wherever that is not ready (or cannot be).
    Call :meth:`start` once, call it as the step's attention from the scheduler
    thread, and :meth:`close` with the engine."""

    def __init__(
        self, *, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, scale: float
    ) -> None:
        self._shape = (heads, kv_heads, dim)
        self._dtype = dtype
        self._scale = scale
        self._ready: dict[int, Products] = {}  # torch threads -> compiled code
        self._asked: set[int] = set()
        self._lock = threading.Lock()
        self._compiling = threading.Lock()  # one compilation at a time
        self._failed = False
        self._closed = False
        self.compilers: list[str] = []
        """The name of the thread of each compilation so far (tests: all are ours)."""
        self.ready = threading.Event()
        """Set once the first compilation (:meth:`start`'s) ended, whether it worked."""

    @property
    def compiled(self) -> bool:
        """Whether the current thread count's calls go to compiled code."""
        return not self._failed and torch.get_num_threads() in self._ready

    @property
    def failed(self) -> bool:
        """Whether the products answer for good (compiling or a compiled call failed)."""
        return self._failed

    def start(self, threads: int | None) -> None:
        """Compile for ``threads`` torch threads (None: this thread's count)."""
        self._ask(threads or torch.get_num_threads(), first=True)

    def close(self) -> None:
        """Compile nothing more (a compilation under way finishes on its own) and drop
        the compiled code."""
        self._closed = True
        self._ready.clear()

    def __call__(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        if not self._failed and query.shape[0] > 1:
            threads = torch.get_num_threads()
            compiled = self._ready.get(threads)
            if compiled is None:
                self._ask(threads)
            else:
                try:
                    contiguous = query.clone(memory_format=torch.contiguous_format)
                    return compiled(contiguous, keys, values, keep, scale)
                except Exception:
                    self._failed = True
                    log.exception("compiled attention failed; the decode step goes on without it")
        return products_attention(query, keys, values, keep, scale)

    # ---- compiling (threads of their own) ----

    def _ask(self, threads: int, *, first: bool = False) -> None:
        with self._lock:
            if threads in self._asked or self._closed:
                return
            self._asked.add(threads)
        thread = threading.Thread(
            target=self._compile, args=(threads, first), name=COMPILER_THREAD, daemon=True
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: serve uncompiled
            log.warning("cannot start compiling the decode step's attention (%s)", exc)
            if first:
                self.ready.set()

    def _compile(self, threads: int, first: bool) -> None:
        try:
            with self._compiling:
                self._compile_for(threads)
        except Exception as exc:
            self._failed = True
            log.warning("cannot compile the decode step's attention (%s); it stays uncompiled", exc)
        finally:
            if first:
                self.ready.set()

    def _compile_for(self, threads: int) -> None:
        # A new thread takes torch's process-wide count at its first question, and
        # any thread may change that count meanwhile: ask first, then set this one's.
        torch.get_num_threads()
        torch.set_num_threads(threads)  # inductor plans its loops for this count
        if self._closed:
            return
        backend = functools.partial(_backend, self.compilers)  # no reference to self
        compiled = _compile(_own_copy(fused_attention), backend)
        start, before = time.monotonic(), len(self.compilers)
        with torch.inference_mode():  # the scheduler's mode: no compiling again for it
            compiled(*self._example(), self._scale)
        if len(self.compilers) == before:
            raise RuntimeError("torch compiled nothing (is TORCH_COMPILE_DISABLE set?)")
        if torch.get_num_threads() != threads:
            raise RuntimeError(f"compiled for {torch.get_num_threads()} threads, not {threads}")
        if not self._closed:
            self._ready[threads] = compiled
        log.info(
            "attention compiled for %d torch threads in %.1f s", threads, time.monotonic() - start
        )

    def _example(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs laid out as the step gives them: a contiguous query (see
        :meth:`__call__`), the first rows of larger buffers, the mask's rows as
        booleans. Their sizes differ from each other and from the model's: torch
        gives equal sizes one symbol, and a call where they differ would compile
        again."""
        heads, kv_heads, dim = self._shape
        taken = {0, 1, heads, kv_heads, heads // kv_heads, dim}
        rows = _unlike(taken, 3)
        width = _unlike(taken | {rows}, 37)
        query = torch.zeros(rows, heads, 1, dim, dtype=self._dtype)
        keys = torch.zeros(rows + 2, kv_heads, width, dim, dtype=self._dtype)[:rows]
        values = torch.zeros(rows + 2, kv_heads, width, dim, dtype=self._dtype)[:rows]
        mask = torch.ones(rows + 2, width, dtype=torch.long)[:rows]
        return query, keys, values, mask.bool()[:, None, None, :]


def _backend(compilers: list[str], graph: Any, inputs: Sequence[Any]) -> Any:
    """Inductor, keeping the products' roundings; only on a compiling thread (anywhere
    else it raises, and the call that asked gets the products from then on). Each
    compilation's thread goes into ``compilers``. (torch keeps every backend for the
    life of the process, so this one holds no engine.)"""
    from torch._inductor.compile_fx import compile_fx

    name = threading.current_thread().name
    compilers.append(name)
    if name != COMPILER_THREAD:
        log.warning("attention would compile on thread %s; it stays uncompiled", name)
        raise RuntimeError(f"attention is compiled on {COMPILER_THREAD} threads only")
    return compile_fx(graph, inputs, config_patches={"emulate_precision_casts": True})


def _unlike(taken: set[int], start: int) -> int:
    """The least size from ``start`` on that is not in ``taken``."""
    size = start
    while size in taken:
        size += 1
    return size


def _own_copy(fn: Any) -> Any:
    """``fn`` with a code object of its own: torch keeps compiled code per code object,
    and a limit of compilations per code object (past it, calls run uncompiled), so
    that engines and thread counts do not share (or exhaust) one cache."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


def _compile(fn: Any, backend: Any) -> Products:
    """``fn`` through torch.compile with dynamic shapes, compiled in this process (no
    pool of compiler processes left running in the worker)."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    compiled: Products = torch.compile(fn, backend=backend, dynamic=True)
    return compiled

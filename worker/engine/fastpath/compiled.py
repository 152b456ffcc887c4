"""bf16/fp16 attention of the decode step compiled into a few loops (torch.compile).

On a CPU the step attends over whole cache rows with two batched products
(:func:`~worker.engine.fastpath.attention.products_attention`). Each (row, head) is a
product of one query with its own keys, so the batched kernels run thousands of tiny
products: at 128 rows, GPT-2's shape, about 1.5-2 ms each where reading the keys takes
0.3 ms. :func:`fused_attention` computes the same as multiplications and sums, which
inductor compiles into one loop nest per product that reads each key and value once,
vectorized: a layer's attention about 1.8x as fast (bench/README.md).

Compiling takes seconds (about 5-40 s on 2 cores, less once inductor's on-disk cache
holds the kernels) and needs a C++ compiler, so :class:`CompiledAttention` compiles
on a thread of its own while the engine serves with the eager products, and the
engine switches once it is warm. Where compiling fails (no compiler, an unsupported
platform) or a compiled call fails, the engine keeps the eager products and says so
in the log once. Shapes are dynamic: one compilation serves every row count and
width (and one more for a single row, which torch specializes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from worker.engine.fastpath.attention import products_attention

log = logging.getLogger(__name__)

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


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
    """:func:`fused_attention` compiled, or :func:`products_attention` until it is (and
    for good where it cannot be). Call :meth:`start` once; then call it as the step's
    attention from the scheduler thread."""

    def __init__(
        self, *, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, scale: float
    ) -> None:
        self._shape = (heads, kv_heads, dim)
        self._dtype = dtype
        self._scale = scale
        self._compiled: Attention | None = None
        self._failed = False
        self.ready = threading.Event()
        """Set once compiling ended, whether it worked (:attr:`compiled`) or not."""

    @property
    def compiled(self) -> bool:
        """Whether calls go to the compiled code."""
        return self._compiled is not None and not self._failed

    def start(self, threads: int | None) -> None:
        """Compile on a new daemon thread with ``threads`` torch threads (those the
        scheduler runs with: inductor plans its parallel loops for them)."""
        thread = threading.Thread(
            target=self._compile, args=(threads,), name="genq-compile", daemon=True
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: serve uncompiled
            log.warning("cannot start compiling the decode step's attention (%s)", exc)
            self.ready.set()

    def __call__(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        compiled = self._compiled
        if compiled is not None and not self._failed:
            try:
                return compiled(query, keys, values, keep, scale)
            except Exception:
                self._failed = True
                log.exception("compiled attention failed; the decode step goes on without it")
        return products_attention(query, keys, values, keep, scale)

    def _compile(self, threads: int | None) -> None:
        try:
            if threads:
                torch.set_num_threads(threads)
            compiled = _compile(fused_attention)
            start = time.monotonic()
            with torch.inference_mode():  # the scheduler's mode: no recompile for it
                for rows in (1, None):  # a single row is its own specialization
                    query, keys, values, keep = self._example(rows)
                    compiled(query, keys, values, keep, self._scale)
            self._compiled = compiled
            log.info("attention compiled in %.1f s", time.monotonic() - start)
        except Exception as exc:
            log.warning("cannot compile the decode step's attention (%s); it stays uncompiled", exc)
        finally:
            self.ready.set()

    def _example(
        self, rows: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of ``rows`` rows (None: any number but 1). Their sizes differ from
        each other and from the model's: torch gives equal sizes one symbol, and a
        later call where they differ would compile again, on the scheduler thread."""
        heads, kv_heads, dim = self._shape
        taken = {1, heads, kv_heads, heads // kv_heads, dim}
        rows = rows or _unlike(taken, 3)
        width = _unlike(taken | {rows}, 37)
        query = torch.zeros(rows, heads, 1, dim, dtype=self._dtype)
        keys = torch.zeros(rows, kv_heads, width, dim, dtype=self._dtype)
        values = torch.zeros(rows, kv_heads, width, dim, dtype=self._dtype)
        keep = torch.ones(rows, 1, 1, width, dtype=torch.bool)
        return query, keys, values, keep


def _unlike(taken: set[int], start: int) -> int:
    """The least size from ``start`` on that is not in ``taken``."""
    size = start
    while size in taken:
        size += 1
    return size


def _compile(fn: Any) -> Attention:
    """``fn`` through torch.compile with dynamic shapes, compiled in this process (no
    pool of compiler processes left running in the worker)."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    compiled: Attention = torch.compile(fn, dynamic=True)
    return compiled

"""The running batch's KV cache as slots, so that requests come and go without copying it.

Every layer keeps one buffer ``[row_capacity, heads, col_capacity, dim]`` for keys and
one for values, and the model sees views of them: rows ``[0, rows)`` and the columns of a
window ``[start, end)``. A row is a *slot*:

- retiring a request only marks its rows free; they keep being computed (the output is
  ignored) until a newcomer takes them, and trailing free rows shrink ``rows`` (a view);
- newcomers are prefilled as their own left-padded mini-batch and only their keys and
  values are copied in, into the lowest free slots, right-aligned to the window's end;
- a decode step writes its column at ``end`` in place;
- columns that are padding in every live row are dropped by moving ``start`` (a view).

On a CPU the buffers hold ``max_rows`` rows from the start (on an accelerator rows grow
by doubling), and the whole cache is copied only when their columns run out: once per
``GROW_CHUNK`` decode steps, or when a newcomer's prompt is wider than the room on the
left. When free slots are left with nothing waiting to fill them (the tail of a
workload), :meth:`SlotCache.compact` moves the last live rows into them, copying only
those rows.

Masked positions always hold finite values (zeros, or the keys of a slot's former
occupant): softmax gives them weight exactly 0, and ``0 * x`` is 0 for finite ``x`` but
NaN for NaN. Fresh key and value buffers are left uninitialized and zeroed only where
the view reaches them: the window's columns of a row when a newcomer takes it, and the
columns a wider newcomer brings into view on the left. Values are finite in every
column of a row in view (zeroed when a newcomer takes the row, and around the copied
window at a reallocation; a compaction moves a row's values whole, not over the window:
a former occupant may have left non-finite ones in the slot): the bf16 decode step
attends over whole rows, the window's columns and the headroom around them, masked
(:mod:`worker.engine.fastpath.attention`).
Zeroing a whole new buffer (hundreds of MB at 160 rows) cost about a second per
reallocation on a CPU, a stall of every running request and of the express lane; and
memory of rows never in view is never touched. Free rows attend only to their own
columns from position 0 (their mask row is cleared and their position does not
advance), so they stay finite and never exceed the context.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Columns of right headroom a reallocation leaves: the cache is copied once per
# GROW_CHUNK decode steps instead of at every step.
GROW_CHUNK = 64
# Left headroom kept across a reallocation, so that a newcomer with a prompt a little
# wider than the window moves ``start`` instead of forcing a copy.
LEFT_ROOM = 64


@dataclasses.dataclass
class Window:
    """What the model sees of the buffers: rows ``[0, rows)``, columns ``[start, end)``."""

    rows: int = 0
    start: int = 0
    end: int = 0

    @property
    def width(self) -> int:
        """Columns in view."""
        return self.end - self.start


class SlotLayer(DynamicLayer):  # type: ignore[misc]
    """One attention layer's keys and values, seen through the shared :class:`Window`.

    ``update`` writes the new columns at ``window.end`` in place; the window itself is
    advanced by :meth:`SlotCache.advance` after the forward, so every layer (and the
    mask, built before the first layer) agrees on the cache length during a forward.
    """

    def __init__(self, window: Window) -> None:
        super().__init__()
        self.window = window
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns after the window; return the window plus them."""
        assert self.key_buffer is not None and self.value_buffer is not None
        w = self.window
        stop = w.end + key_states.shape[-2]
        assert stop <= self.key_buffer.shape[-2], "SlotCache.step_inputs reserves the room"
        self.key_buffer[: w.rows, :, w.end : stop] = key_states
        self.value_buffer[: w.rows, :, w.end : stop] = value_states
        return (
            self.key_buffer[: w.rows, :, w.start : stop],
            self.value_buffer[: w.rows, :, w.start : stop],
        )

    def get_seq_length(self) -> int:
        """Columns in view (not the buffer's capacity)."""
        return self.window.width


def supports(config: Any) -> bool:
    """Whether ``config``'s model has only plain full-attention cache layers.

    Sliding-window and linear-attention layers keep state that slots cannot
    rearrange; the batching engine refuses such models rather than run them wrongly.
    """
    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def uninitialized(like: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A key or value buffer whose contents are not set (tests fill it with NaN)."""
    return like.new_empty(shape)


def _regrown(
    old: torch.Tensor,
    rows: slice,
    cols: slice,
    row_cap: int,
    col_cap: int,
    left: int,
    *,
    zero_rows: bool = False,
) -> torch.Tensor:
    """A new ``[row_cap, ..., col_cap, ...]`` buffer (columns on dim 2, or dim 1 for a
    mask) holding ``old[rows, ..., cols]`` at ``[:k, ..., left:left + width]``; a mask is
    zero elsewhere, keys and values are left unset there but for the ``k`` rows' other
    columns with ``zero_rows`` (the module's docstring)."""
    dim = 2 if old.dim() == 4 else 1
    part = old.narrow(dim, cols.start, cols.stop - cols.start)[rows]
    kept, width = part.shape[0], part.shape[dim]
    shape = list(old.shape)
    shape[0], shape[dim] = row_cap, col_cap
    new = uninitialized(old, shape) if dim == 2 else old.new_zeros(shape)
    new[:kept].narrow(dim, left, width).copy_(part)
    if zero_rows and dim == 2:
        new[:kept, :, :left] = 0
        new[:kept, :, left + width :] = 0
    return new


class SlotCache:
    """The running batch's per-row state: KV slots, attention mask, positions, last tokens.

    The engine owns which request holds which rows; this class only knows which rows
    are live. ``cache`` is the ``DynamicCache`` to hand the model for a decode step.
    """

    def __init__(self, config: Any, max_rows: int) -> None:
        if not supports(config):
            raise ValueError(
                "continuous batching needs a model whose cache layers are all plain full"
                " attention (no sliding-window or linear-attention layers)"
            )
        self.max_rows = max_rows
        self.window = Window()
        self.cache = DynamicCache(config=config)
        self.layers = [SlotLayer(self.window) for _ in self.cache.layers]
        self.cache.layers = list(self.layers)
        self.mask: torch.Tensor | None = None  # [row_cap, col_cap] int64
        self.positions = torch.zeros(0, dtype=torch.long)  # next position of each row
        self.last = torch.zeros(0, dtype=torch.long)  # the token each row feeds next
        self.live = torch.zeros(0, dtype=torch.long)  # 1 for a live row, 0 for a free slot
        self.copies = 0  # whole-cache copies so far (reallocations)

    # ---- sizes ----

    @property
    def rows(self) -> int:
        """Rows in view, live or free."""
        return self.window.rows

    @property
    def row_capacity(self) -> int:
        """Rows the buffers hold."""
        return int(self.live.shape[0])

    @property
    def col_capacity(self) -> int:
        """Columns the buffers hold."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def free_rows(self) -> int:
        """Free slots among the rows in view."""
        return self.rows - int(self.live[: self.rows].sum())

    # ---- the running batch ----

    def admit(self, prefill: Any, mask: torch.Tensor, first: torch.Tensor) -> list[int]:
        """Copy a prefilled mini-batch into free slots; return the slot of each of its rows.

        ``prefill`` is the newcomers' own ``DynamicCache`` (left padded, ``mask`` is its
        ``[k, width]`` attention mask) and ``first`` their first chosen tokens.
        """
        count, width = mask.shape
        free = (self.live[: self.rows] == 0).nonzero().flatten().tolist()
        slots = (free + list(range(self.rows, self.rows + count)))[:count]
        needed = max(self.rows, slots[-1] + 1)
        if self.mask is None:
            self._allocate(prefill, mask, needed, width)
        elif needed > self.row_capacity or width > self.window.end:
            self._reallocate(
                row_cap=self._grown_rows(needed, self.mask.device),
                left=max(0, width - self.window.width),
                right=GROW_CHUNK,
            )
        w = self.window
        before = Window(w.rows, w.start, w.end)
        w.rows = needed
        w.start = min(w.start, w.end - width)
        assert self.mask is not None
        cols = slice(w.end - width, w.end)
        index: torch.Tensor | slice = torch.tensor(slots, dtype=torch.long, device=mask.device)
        if slots == list(range(slots[0], slots[0] + count)):
            index = slice(slots[0], slots[0] + count)  # plain copies instead of index_put
        for layer, new in zip(self.layers, prefill.layers, strict=True):
            if layer.key_buffer is None or layer.value_buffer is None:
                continue  # a layer that holds no keys (KV sharing)
            # Columns now in view that nobody wrote: left of the old window for the
            # rows already there, left of the prompt for the newcomers' rows; and every
            # other value of the newcomers' rows (values stay finite in whole rows).
            layer.key_buffer[: before.rows, :, w.start : before.start] = 0
            layer.key_buffer[index, :, w.start : cols.start] = 0
            layer.value_buffer[index] = 0
            layer.key_buffer[index, :, cols] = new.keys
            layer.value_buffer[index, :, cols] = new.values
        self.mask[index] = 0
        self.mask[index, cols] = mask
        self.positions[index] = mask.sum(-1)
        self.last[index] = first
        self.live[index] = 1
        return slots

    def retire(self, slots: list[int]) -> None:
        """Free ``slots`` (no copy); drop trailing free rows and all-padding leading columns."""
        if not slots or self.mask is None:
            return
        index = torch.tensor(slots, dtype=torch.long, device=self.mask.device)
        self.live[index] = 0
        self.positions[index] = 0
        self.mask[index] = 0
        w = self.window
        live_rows = self.live[: w.rows].nonzero()
        if live_rows.numel() == 0:
            self.clear()
            return
        w.rows = int(live_rows[-1]) + 1
        used = (self.mask[: w.rows, w.start : w.end] * self.live[: w.rows, None]).any(dim=0)
        w.start += int(torch.argmax(used.to(torch.int8)))

    def compact(self) -> dict[int, int]:
        """Move the highest live rows into the lowest free slots, so that no row in view is
        free; return ``{old row: new row}`` for the rows that moved.

        Only the moved rows are copied (a row costs about what computing it for one decode
        step costs, and a free row in view costs that at every step), so this pays at once
        when nothing waits to take the free slots.
        """
        w = self.window
        live = self.live[: w.rows]
        count = int(live.sum())
        holes = (live[:count] == 0).nonzero().flatten()
        movers = live[count:].nonzero().flatten() + count
        if holes.numel():
            cols = slice(w.start, w.end)
            for layer in self.layers:
                if layer.key_buffer is not None:
                    layer.key_buffer[holes, :, cols] = layer.key_buffer[movers, :, cols]
                if layer.value_buffer is not None:
                    # Whole rows: a hole's former occupant may have left non-finite values
                    # outside the window, and values are read in every column of a row in
                    # view (the module's docstring).
                    layer.value_buffer[holes] = layer.value_buffer[movers]
            assert self.mask is not None
            self.mask[holes] = self.mask[movers]
            for per_row in (self.positions, self.last, self.live):
                per_row[holes] = per_row[movers]
            self.live[movers] = 0
        w.rows = count
        return dict(zip(movers.tolist(), holes.tolist(), strict=True))

    def reorder(self, rows: list[int], sources: list[int], *, newest: int | None = None) -> None:
        """Beam search: row ``rows[i]`` continues the sequence of row ``sources[i]`` (its
        parent, among ``rows``); copy the parents' keys and values in place.

        Only rows whose parent is another row are written (a beam that continues itself
        costs nothing). The rows of one request share their mask and positions (one
        prompt, one length), so only the keys and values move; and where the caller
        knows the rows differ only in their ``newest`` columns (the prompt's keys and
        values are the same in every beam), only those are copied.
        """
        moved = [(row, src) for row, src in zip(rows, sources, strict=True) if row != src]
        if not moved:
            return
        device = self.live.device
        dst = torch.tensor([row for row, _ in moved], dtype=torch.long, device=device)
        src = torch.tensor([src for _, src in moved], dtype=torch.long, device=device)
        w = self.window
        first = w.start if newest is None else max(w.start, w.end - newest)
        cols = slice(first, w.end)
        for layer in self.layers:
            for buffer in (layer.key_buffer, layer.value_buffer):
                if buffer is not None:
                    # The right side is gathered first, so a swap of two rows is safe.
                    buffer[dst, :, cols] = buffer[src, :, cols]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` for one decode step."""
        assert self.mask is not None
        w = self.window
        if w.end >= self.col_capacity:
            self._reallocate(self.row_capacity, min(w.start, LEFT_ROOM), GROW_CHUNK)
        # Free rows attend to this column too: a row with nothing to attend to would
        # produce NaN, and NaN written into its slot would poison the next occupant.
        self.mask[: w.rows, w.end] = 1
        return (
            self.last[: w.rows, None],
            self.mask[: w.rows, w.start : w.end + 1],
            self.positions[: w.rows, None],
        )

    def advance(self, chosen: torch.Tensor) -> None:
        """After a decode forward: take its column into view and feed ``chosen`` next."""
        w = self.window
        w.end += 1
        self.positions[: w.rows] += self.live[: w.rows]
        self.last[: w.rows] = chosen

    def clear(self) -> None:
        """Drop everything (and the memory): the batch is empty."""
        for layer in self.layers:
            layer.key_buffer = layer.value_buffer = None
        self.mask = None
        self.window.rows = self.window.start = self.window.end = 0
        self.positions = self.positions.new_zeros(0)
        self.last = self.last.new_zeros(0)
        self.live = self.live.new_zeros(0)

    # ---- buffers ----

    def _grown_rows(self, needed: int, device: torch.device) -> int:
        """Row capacity for ``needed`` rows (or ``needed`` itself, for an oversized
        request that runs alone). On a CPU, ``max_rows`` at once: rows never in view
        are never written, so the memory of a large buffer's spare rows is never
        committed, and growing by doubling copied the whole cache at each doubling (a
        stall of every running request while a burst of newcomers filled the batch).
        On an accelerator memory is real when allocated: double, up to ``max_rows``."""
        if device.type == "cpu":
            return max(needed, self.max_rows)
        capacity = max(1, self.row_capacity)
        while capacity < needed:
            capacity *= 2
        return max(needed, min(capacity, self.max_rows))

    def _allocate(self, prefill: Any, mask: torch.Tensor, rows: int, width: int) -> None:
        """First admission into an empty batch: buffers shaped like the prefill's layers."""
        row_cap, col_cap = self._grown_rows(rows, mask.device), width + GROW_CHUNK
        for layer, new in zip(self.layers, prefill.layers, strict=True):
            if not getattr(new, "is_initialized", False) or new.keys is None:
                continue
            heads, dim = new.keys.shape[1], new.keys.shape[3]
            layer.key_buffer = uninitialized(new.keys, [row_cap, heads, col_cap, dim])
            layer.value_buffer = uninitialized(new.values, [row_cap, heads, col_cap, dim])
            layer.is_initialized = True
            layer.device = new.keys.device
        self.mask = mask.new_zeros((row_cap, col_cap))
        self.positions = mask.new_zeros(row_cap)
        self.last = mask.new_zeros(row_cap)
        self.live = mask.new_zeros(row_cap)
        self.window.rows, self.window.start, self.window.end = 0, width, width

    def _reallocate(self, row_cap: int, left: int, right: int) -> None:
        """Copy the window into new buffers with ``left`` and ``right`` columns of
        headroom; the one place the whole cache is copied."""
        assert self.mask is not None
        w = self.window
        which = slice(0, w.rows)
        cols, width = slice(w.start, w.end), w.width
        col_cap = left + width + right
        try:
            for layer in self.layers:
                if layer.key_buffer is None or layer.value_buffer is None:
                    continue
                layer.key_buffer = _regrown(layer.key_buffer, which, cols, row_cap, col_cap, left)
                layer.value_buffer = _regrown(
                    layer.value_buffer, which, cols, row_cap, col_cap, left, zero_rows=True
                )
            self.mask = _regrown(self.mask, which, cols, row_cap, col_cap, left)
            self.positions = self._regrown_rows(self.positions, which, row_cap)
            self.last = self._regrown_rows(self.last, which, row_cap)
            self.live = self._regrown_rows(self.live, which, row_cap)
        except BaseException:
            # Some layers hold new buffers, unset outside what was copied, that the old
            # window does not fit: nothing of the batch can be trusted. Empty it (its
            # requests start again, the engine's part) rather than hold a view whose
            # keys are garbage. (Buffers are replaced one at a time, so the peak is the
            # old cache plus one layer's new buffers, not two caches.)
            self.clear()
            raise
        w.start, w.end = left, left + width
        self.copies += 1

    @staticmethod
    def _regrown_rows(old: torch.Tensor, rows: slice, row_cap: int) -> torch.Tensor:
        part = old[rows]
        new = old.new_zeros(row_cap)
        new[: part.shape[0]] = part
        return new

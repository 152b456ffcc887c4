"""The custom_ids a batch's ingest has seen, in about 16 bytes a line.

A Python set of the strings costs ~100 bytes a line (100 MB at a million lines).
Here each id is kept as its 64-bit hash in one ``array('q')``, in input order (the
position of a request: the index of its job id in the batch's id sequence), and an
open-addressing table of positions (``array('i')``, load at most 0.6) finds an
equal hash in O(1). An equal hash is not taken on trust: the caller confirms that
the two strings are equal (its callback reads the earlier job's custom_id), so a
collision never fails a batch.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

_INITIAL_SLOTS = 1 << 12


def _hash(custom_id: str) -> int:
    """The 64-bit hash kept for a custom_id (Python's own: SipHash, keyed per process)."""
    return hash(custom_id)


class SeenIds:
    """The custom_ids seen so far, by position (0, 1, ...: the order they were added)."""

    def __init__(self) -> None:
        self._hashes = array("q")
        self._slots = array("i", bytes(4 * _INITIAL_SLOTS))  # position + 1; 0: empty

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, custom_id: str, same: Callable[[int, str], bool]) -> int | None:
        """Add ``custom_id`` at the next position and return None; or, when an earlier
        position holds the same id (its hash matches and ``same(position, custom_id)``
        confirms that the string does), return that position and add nothing."""
        hashes, slots = self._hashes, self._slots
        h = _hash(custom_id)
        mask = len(slots) - 1
        i = h & mask
        while slot := slots[i]:
            if hashes[slot - 1] == h and same(slot - 1, custom_id):
                return slot - 1
            i = (i + 1) & mask
        hashes.append(h)
        slots[i] = len(hashes)
        if len(hashes) * 5 > len(slots) * 3:
            self._grow()
        return None

    def _grow(self) -> None:
        slots = array("i", bytes(8 * len(self._slots)))
        mask = len(slots) - 1
        for position, h in enumerate(self._hashes, start=1):
            i = h & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = position
        self._slots = slots

    def nbytes(self) -> int:
        """The memory the table holds (for tests and benchmarks)."""
        return self._hashes.buffer_info()[1] * 8 + len(self._slots) * 4

"""Reachability checks used by /readyz and the CLI."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import text

from core.db import get_engine
from core.queue import JobQueue


def _probe(check: Callable[[], object]) -> str:
    try:
        check()
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"[:300]
    return "ok"


def check_database(url: str) -> str:
    """``"ok"`` or why the database cannot be reached."""

    def select_one() -> None:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))

    return _probe(select_one)


def check_broker(queue: JobQueue) -> str:
    """``"ok"`` or why the broker cannot be reached."""
    return _probe(queue.ping)

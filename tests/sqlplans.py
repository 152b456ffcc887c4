"""What a call's SQL reads: its statements, and the job rows each one reads by its
plan (PostgreSQL's ``EXPLAIN ANALYZE``, SQLite's ``EXPLAIN QUERY PLAN``). For tests
that a statement's cost does not grow with rows it has no business reading."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine


def statements_of(engine: Engine, call: Any) -> list[tuple[str, Any]]:
    """The statements (with their parameters) that ``call`` runs on ``engine``."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return seen


def job_reads(plan: dict[str, Any]) -> Iterator[tuple[str | None, float]]:
    """(index, rows read) of each node of a PostgreSQL plan that reads the job table
    or one of its indexes (a bitmap index scan names no table: its index entries
    count too, else a ``BitmapAnd`` of a small and a huge index would read cheap)."""
    index = plan.get("Index Name") or ""
    if plan.get("Relation Name") == "job" or index == "pk_job" or index.startswith("ix_job_"):
        rows = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
        yield plan.get("Index Name"), rows * plan.get("Actual Loops", 1)
    for child in plan.get("Plans", []):
        yield from job_reads(child)


def postgres_job_reads(
    engine: Engine, statement: str, parameters: Any
) -> list[tuple[str | None, float]]:
    """Run ``statement`` under ``EXPLAIN ANALYZE`` (in a transaction rolled back):
    (index, rows read) of each node that reads the job table."""
    with engine.connect() as conn:
        found = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
        [plan] = json.loads(value) if isinstance(value := found.scalar_one(), str) else value
        conn.rollback()
    return list(job_reads(plan["Plan"]))


def sqlite_job_plan(engine: Engine, statement: str, parameters: Any) -> list[str]:
    """SQLite's plan lines for the job table (``SCAN job …`` / ``SEARCH job USING …``)."""
    with engine.connect() as conn:
        details = [
            row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
        ]
    return [d for d in details if d.split()[:2] in (["SCAN", "job"], ["SEARCH", "job"])]


def postgres_job_blocks(engine: Engine, statement: str, parameters: Any) -> int:
    """Run ``statement`` under ``EXPLAIN (ANALYZE, BUFFERS)`` (rolled back): the pages
    its nodes on the job table and its indexes touched. Unlike rows, pages count the
    index entries a scan steps over (those of dead rows, not yet vacuumed)."""
    with engine.connect() as conn:
        found = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters
        )
        [plan] = json.loads(value) if isinstance(value := found.scalar_one(), str) else value
        conn.rollback()
    return sum(_job_blocks(plan["Plan"]))


def _job_blocks(plan: dict[str, Any]) -> Iterator[int]:
    index = plan.get("Index Name") or ""
    if plan.get("Relation Name") == "job" or index == "pk_job" or index.startswith("ix_job_"):
        yield plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
    for child in plan.get("Plans", []):
        yield from _job_blocks(child)

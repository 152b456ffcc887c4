"""What the feeder's top-up costs as a large batch's sent jobs pile up (PostgreSQL).

    python -m bench.feed_topup --jobs 200000 [--rounds 2]

A sent job's entry stays in ``ix_job_unsent`` until vacuum removes it, and autovacuum
may not vacuum the job table during a large batch (this bench turns it off for the
table, as it was in the 1M run). On a fresh database per run, it inserts one
in-progress batch of ``--jobs`` unsent jobs and tops a queue up window by window
(``core.feed.batches_to_feed`` then ``take_unsent``, as ``feed_once`` does) until
all are sent, in two modes alternated in one run:

- ``cursor``: as genq runs (:mod:`core.feedcursor`: each top-up reads after the last
  id taken);
- ``from start``: every top-up reads the batch's unsent jobs from its first entry
  (the cursor's look behind made due on every top-up), as genq did before.

Prints the top-up time at each tenth of the batch sent, the total, and the ratio,
with the CPU's flags. It asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from sqlalchemy import text

import migrations
from bench._cpu import cpu_flags
from bench._services import postgres_database
from core import feed, feedcursor
from core.db import get_engine, get_sessionmaker
from core.models import Batch

WINDOW = 2048  # GENQ_FEED_AHEAD's default for one worker


def run(jobs: int, *, from_start: bool) -> list[tuple[int, float]]:
    """(jobs sent, top-up ms) of every top-up of one batch on a fresh database."""
    with postgres_database() as url:
        migrations.upgrade(url)
        with get_engine(url).begin() as conn:
            conn.execute(text("ALTER TABLE job SET (autovacuum_enabled = false)"))
        factory = get_sessionmaker(url)
        with factory() as session:
            session.add(
                Batch(
                    id="batch_bench",
                    owner="bench",
                    status="in_progress",
                    endpoint="/v1/completions",
                    completion_window="24h",
                    total=jobs,
                    priority="low",
                )
            )
            session.commit()
        with get_engine(url).begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO job (id, status, prompt, model, params, attempts, created_at,"
                    " batch_id, priority) SELECT 'job_' || lpad(g::text, 12, '0'), 'queued',"
                    " 'p', 'fake', '{}', 0, now(), 'batch_bench', 'low'"
                    " FROM generate_series(1, :n) AS g"
                ),
                {"n": jobs},
            )
            conn.execute(text("ANALYZE job"))
        saved = feedcursor.LOOK_BEHIND_EVERY_S
        feedcursor.LOOK_BEHIND_EVERY_S = -1.0 if from_start else saved
        try:
            return _top_up_until_sent(factory)
        finally:
            feedcursor.LOOK_BEHIND_EVERY_S = saved
            get_engine(url).dispose()


def _top_up_until_sent(factory: Any) -> list[tuple[int, float]]:
    sent, rows = 0, list[tuple[int, float]]()
    while True:
        started = time.perf_counter()
        with factory() as session:
            fed = [batch_id for batch_id, _ in feed.batches_to_feed(session)]
        if not fed:
            return rows
        with factory() as session:
            routes = feed.take_unsent(
                session, batch_ids=fed, model="fake", priority="low", limit=WINDOW
            )
            session.commit()
        sent += len(routes)
        rows.append((sent, (time.perf_counter() - started) * 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternated")
    args = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}; {args.jobs:,} jobs, windows of {WINDOW}")
    totals: dict[str, list[float]] = {"cursor": [], "from start": []}
    for round_ in range(args.rounds):
        for mode in ("from start", "cursor") if round_ % 2 == 0 else ("cursor", "from start"):
            rows = run(args.jobs, from_start=mode == "from start")
            totals[mode].append(sum(ms for _, ms in rows) / 1000)
            tenth = max(1, len(rows) // 10)
            marks = "  ".join(f"{sent // 1000}k:{ms:.0f}" for sent, ms in rows[tenth - 1 :: tenth])
            print(f"round {round_ + 1} {mode:>10}: {totals[mode][-1]:6.1f} s in {len(rows)} "
                  f"top-ups; ms per top-up at jobs sent: {marks}")  # fmt: skip
    before, after = statistics.median(totals["from start"]), statistics.median(totals["cursor"])
    print(f"median total: from start {before:.1f} s, cursor {after:.1f} s: {before / after:.2f}x")


if __name__ == "__main__":
    main()

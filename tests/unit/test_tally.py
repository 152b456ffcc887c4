"""A batch's counts are kept as its jobs finish (core.tally): each final transition
counts once, a retried store does not count twice, and folding changes nothing read."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from core import batches, jobstate, tally
from core.db import get_sessionmaker
from core.models import Batch, BatchTally
from core.settings import Settings
from tests.unit.test_feed import make_batch, make_settings

OUTCOME = jobstate.Outcome(
    outputs=["x"],
    finish_reasons=["length"],
    prompt_tokens=2,
    completion_tokens=1,
    model_revision="fake",
    torch_version="-",
    transformers_version="-",
)


def read(settings: Settings, batch_id: str) -> batches.Counts:
    with get_sessionmaker(settings.resolved_database_url)() as session:
        return batches.counts(session, batch_id)


def test_counts_follow_each_final_transition_once(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path)
    batch_id, ids = make_batch(settings)
    factory = get_sessionmaker(settings.resolved_database_url)
    assert read(settings, batch_id).active == len(ids)
    with factory() as session:
        claims, _ = jobstate.claim_fresh(session, ids[:3], worker="w", lease_s=60)
        session.commit()
    a, b, c = claims
    stored: list[tuple[jobstate.Claim, jobstate.Outcome | jobstate.Failure]] = [
        (a, OUTCOME),
        (b, jobstate.Failure("boom", "it broke")),
    ]
    for _ in range(2):  # the second is a retry after an ambiguous commit
        with factory() as session:
            jobstate.store_outcomes(session, stored)
            session.commit()
    counts = read(settings, batch_id)
    assert (counts.completed, counts.failed, counts.active) == (1, 1, len(ids) - 2)
    assert (counts.prompt_tokens, counts.completion_tokens) == (2, 1)
    with factory() as session:
        batches.cancel_batch(session, batch_id, owner=None)  # c (running) and the rest
        session.commit()
    with factory() as session:  # c's late result keeps it cancelled, not counted again
        jobstate.store_outcomes(session, [(c, OUTCOME)])
        session.commit()
    counts = read(settings, batch_id)
    assert (counts.completed, counts.failed, counts.active) == (1, len(ids) - 1, 0)
    with factory() as session:
        tally.fold(session, batch_id)
        session.commit()
        assert session.scalar(select(func.count()).select_from(BatchTally)) == 0
        assert session.get_one(Batch, batch_id).failed_count == len(ids) - 1
    assert read(settings, batch_id) == counts

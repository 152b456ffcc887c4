"""The worker registry: workers heart-beat a row, so the API knows what is served."""

from __future__ import annotations

import datetime as dt
import time

from sqlalchemy import ColumnElement, case, delete, func, select, update
from sqlalchemy.orm import Session

from core.models import WorkerNode, utcnow


def heartbeat(
    session: Session,
    *,
    name: str,
    model: str,
    queues: list[str],
    in_flight: int,
    tokens_generated: int,
    chat: bool = False,
) -> None:
    """Create or refresh this worker's row (``chat``: its model has a chat template)."""
    values = {
        "model": model,
        "chat": chat,
        "queues": queues,
        "last_seen": utcnow(),
        "in_flight": in_flight,
        "tokens_generated": tokens_generated,
    }
    updated = session.execute(update(WorkerNode).where(WorkerNode.name == name).values(**values))
    if not updated.rowcount:  # type: ignore[attr-defined]
        session.add(WorkerNode(name=name, started_at=utcnow(), **values))


def deregister(session: Session, name: str) -> None:
    session.execute(delete(WorkerNode).where(WorkerNode.name == name))


def _alive(within_s: float) -> ColumnElement[bool]:
    return WorkerNode.last_seen >= utcnow() - dt.timedelta(seconds=within_s)


def live_workers(session: Session, *, within_s: float) -> list[WorkerNode]:
    """Workers seen in the last ``within_s`` seconds."""
    query = select(WorkerNode).where(_alive(within_s)).order_by(WorkerNode.name)
    return list(session.scalars(query))


def live_models(session: Session, *, within_s: float) -> dict[str, int]:
    """Models served by live workers, with how many workers serve each."""
    rows = session.execute(
        select(WorkerNode.model, func.count()).where(_alive(within_s)).group_by(WorkerNode.model)
    )
    return {str(model): int(count) for model, count in rows}


def models_without_chat_template(session: Session, *, within_s: float) -> set[str]:
    """Models whose live workers all say their tokenizer has no chat template."""
    rows = session.execute(
        select(WorkerNode.model)
        .where(_alive(within_s))
        .group_by(WorkerNode.model)
        .having(func.max(case((WorkerNode.chat, 1), else_=0)) == 0)
    )
    return {str(model) for (model,) in rows}


_CACHE_S = 2.0
_cache: dict[tuple[str, float], tuple[float, dict[str, int]]] = {}


def live_models_cached(session: Session, *, within_s: float) -> dict[str, int]:
    """:func:`live_models`, remembered for two seconds per database: a submit
    checks its model without a query each time, and a new worker shows up at
    once on the scale of its heartbeat."""
    key = (str(session.get_bind().engine.url), within_s)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and now - hit[0] < _CACHE_S:
        return hit[1]
    models = live_models(session, within_s=within_s)
    _cache[key] = (now, models)
    return models


def serving(session: Session, model: str, *, within_s: float) -> list[str]:
    """The names of the live workers that serve ``model``."""
    query = (
        select(WorkerNode.name)
        .where(_alive(within_s), WorkerNode.model == model)
        .order_by(WorkerNode.name)
    )
    return list(session.scalars(query))

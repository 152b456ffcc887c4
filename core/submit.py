"""One way to create jobs, whatever the door: validate → rows → commit → messages.

``POST /v1/jobs``, ``/v1/jobs/bulk`` and ``/v1/completions`` call
:func:`submit_job` / :func:`submit_jobs`; batch ingest (the Batch API and
``genq run``) builds its rows with :func:`job_row` from ids of :func:`id_sequence`;
everything that sends job messages after a commit (these, batches, the sweeper's
re-sends, a worker's hand-back) calls :func:`send`.

The row is committed first: a job exists once its row does. If the broker is
unreachable the job stays queued in SQL, and the sweeper re-sends it. One seed
draw (:func:`draw_seed`) fixes the seed of every job that gave none.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import egress, express, idempotency, quotas, workers
from core.chat import template_messages
from core.errors import CoreError
from core.jobs import get_job, submission_jobs
from core.models import LOCAL_OWNER, Job, utcnow
from core.openai_format import ParsedRequest
from core.queue import JobQueue, Route
from core.schemas import GenerationParams, JobCreate
from core.settings import Settings, model_id, served_model
from core.status import JobStatus

log = logging.getLogger(__name__)


class UnknownModelError(CoreError, ValueError):
    """The job asks for a model no worker serves (HTTP 422 ``model_not_found``)."""

    code = "model_not_found"

    def __init__(self, model: str, available: Sequence[str], *, param: str = "model") -> None:
        super().__init__(
            f"model {model!r} is not served; available: {', '.join(available)}", param=param
        )
        self.model = model
        self.available = list(available)


class RequestTooLargeError(CoreError, ValueError):
    """The job needs more of a worker's cache than a worker has: it could never run
    (HTTP 422 ``invalid_request``)."""


class NoChatTemplateError(CoreError, ValueError):
    """Chat messages for a model whose tokenizer has no chat template (HTTP 422
    ``model_without_chat_template``)."""

    code = "model_without_chat_template"

    def __init__(self, model: str, *, param: str = "model") -> None:
        super().__init__(
            f"model {model!r} has no chat template: send a prompt instead of messages",
            param=param,
        )
        self.model = model


@dataclasses.dataclass(frozen=True)
class NewJob:
    """A validated request for one job, from any door."""

    prompt: str
    model: str
    params: GenerationParams
    priority: str = "normal"
    callback_url: str | None = None
    custom_id: str | None = None
    # A chat job: rendered by the worker with the model's template (prompt empty).
    messages: list[dict[str, str]] | None = None

    @classmethod
    def from_create(cls, body: JobCreate, *, default_model: str) -> NewJob:
        """From ``POST /v1/jobs`` (or one job of a bulk submit)."""
        return cls(
            prompt=body.prompt or "",
            messages=template_messages(body.messages) if body.messages else None,
            # As the caller spelt it: create() makes it the served id (or refuses it).
            model=body.model or default_model,
            params=body.params(),
            priority=body.priority,
            callback_url=str(body.callback_url) if body.callback_url else None,
        )

    @classmethod
    def from_request(cls, request: ParsedRequest, *, priority: str = "normal") -> NewJob:
        """From an OpenAI request (``/v1/completions``, a batch line, ``genq run``)."""
        return cls(
            prompt=request.prompt,
            messages=request.messages,
            model=request.model,
            params=request.params,
            priority=priority,
            custom_id=request.custom_id,
        )


# --- ids and seeds -----------------------------------------------------------------------


def new_job_id() -> str:
    """A time-ordered id: 48 bits of milliseconds then 80 random bits, in hex.

    Sorting by id is sorting by creation time, which makes cursor pagination a
    plain ``id < after``.
    """
    millis = time.time_ns() // 1_000_000
    return f"job_{millis:012x}{secrets.token_hex(10)}"


def id_sequence(prefix: str | None = None) -> Iterator[str]:
    """Ids for jobs created together: like :func:`new_job_id`, but the random part
    is 32 bits shared by the group and then a counter, so they also sort in the
    order they were made (a batch's jobs sort as its input). The n-th one (from 0)
    is ``sequence_id(prefix, n)``, given the ``prefix`` of :func:`sequence_prefix`."""
    prefix = prefix or sequence_prefix()
    return (sequence_id(prefix, index) for index in itertools.count())


def sequence_prefix() -> str:
    """What the ids of one :func:`id_sequence` share: the time and a random group."""
    return f"job_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"


def sequence_id(prefix: str, index: int) -> str:
    """The ``index``-th id (from 0) of the sequence with that prefix."""
    return f"{prefix}{index:012x}"


def new_job_ids(count: int) -> list[str]:
    """``count`` ids of :func:`id_sequence`."""
    return list(itertools.islice(id_sequence(), count))


def draw_seed() -> int:
    """A seed for a job that gave none, stored so the job can be reproduced. From the
    system's randomness each time: a generator's outputs (Mersenne Twister) would let
    a caller who read 624 of its seeds compute every other caller's."""
    return int.from_bytes(os.urandom(4), "big")


# --- rows, commit, messages --------------------------------------------------------------


def job_row(
    new: NewJob,
    *,
    job_id: str,
    owner: str,
    default_max_new_tokens: int,
    now: Any = None,
    submission_id: str | None = None,
    batch_id: str | None = None,
) -> dict[str, Any]:
    """The row of a queued job, with its parameters and seed fixed (for a bulk insert)."""
    params, stored = _stored_params(new.params, default_max_new_tokens)
    now = now or utcnow()
    return {
        "id": job_id,
        "status": JobStatus.QUEUED,
        "prompt": new.prompt,
        "messages": new.messages,
        "model": new.model,
        "params": stored,
        "seed": params.seed if params.seed is not None else draw_seed(),
        "owner": owner,
        "priority": new.priority,
        "callback_url": new.callback_url,
        "custom_id": new.custom_id,
        "batch_id": batch_id,
        "submission_id": submission_id,
        "attempts": 0,
        "created_at": now,
        # A batch's jobs wait for the feeder (core.feed), which sends them a window
        # at a time; other jobs are sent by their caller right after the commit.
        "enqueued_at": None if batch_id else now,
    }


_STORED: dict[tuple[int, int], tuple[GenerationParams, GenerationParams, dict[str, Any]]] = {}
"""(``id(params)``, the default) -> (params, with defaults, dumped), at most 256."""


def _stored_params(
    params: GenerationParams, default_max_new_tokens: int
) -> tuple[GenerationParams, dict[str, Any]]:
    """``params`` with their defaults, and the JSON values a job row stores of them.

    A batch's lines mostly share one frozen parameters object
    (:func:`core.openai_format.validate_params` remembers those of plain values), so
    such an object is dumped once: remembered by identity, as it holds a list
    (``stop``, empty) and so has no hash, the entry keeping the object alive so that
    no other object takes its id. Each row gets a dict of its own (plain values and a
    fresh empty ``stop``), so no row's dict is another's.
    Parameters with stop strings or a response format are dumped each time: their
    objects are not shared, and a schema may be large."""
    if params.stop or params.response_format is not None:
        return _dumped(params, default_max_new_tokens)
    key = (id(params), default_max_new_tokens)
    hit = _STORED.get(key)
    if hit is None:  # (the entry holds params: its id is not another object's meanwhile)
        hit = (params, *_dumped(params, default_max_new_tokens))
        if len(_STORED) >= 256:
            _STORED.clear()
        _STORED[key] = hit
    return hit[1], {**hit[2], "stop": []}  # a row's own: nothing in it is shared


def _dumped(
    params: GenerationParams, default_max_new_tokens: int
) -> tuple[GenerationParams, dict[str, Any]]:
    full = params.with_defaults(default_max_new_tokens)
    return full, full.model_dump(mode="json", exclude_none=True)


def send(queue: JobQueue | None, routes: Sequence[Route]) -> bool:
    """Send committed jobs' messages; False (logged) when the broker failed: the jobs
    stay queued in SQL and the sweeper re-sends them."""
    if queue is None or not routes:
        return True
    try:
        queue.enqueue_many(routes)
    except Exception:
        log.warning(
            "could not send %d jobs; they stay queued for the sweeper", len(routes), exc_info=True
        )
        return False
    return True


def routes_of(rows: Sequence[dict[str, Any]], settings: Settings) -> list[Route]:
    """Where each new row's message goes: short jobs of normal priority to the express
    queue while their owner's express budget lasts (:mod:`core.express`), the others
    to the queue of their priority."""
    limit = settings.express_max_new_tokens
    return [
        Route(
            row["id"],
            row["model"],
            row["priority"],
            express=express.sends_express(row, limit) and express.paced(row["owner"]),
        )
        for row in rows
    ]


def served_models(session: Session, settings: Settings, *, fresh: bool = False) -> list[str]:
    """The models jobs may ask for: the configured ones and those live workers serve
    (as seen up to two seconds ago, unless ``fresh``)."""
    within_s = settings.worker_heartbeat_s * 3
    if fresh:
        live = workers.live_models(session, within_s=within_s)
    else:
        live = workers.live_models_cached(session, within_s=within_s)
    return sorted({*map(model_id, settings.models), settings.model_id, *live})


def check_models(
    session: Session, settings: Settings, models: Sequence[str], *, param: Callable[[int], str]
) -> list[str]:
    """The served id each of ``models`` (as callers spell them) names
    (:func:`core.settings.served_model`); raise UnknownModelError, naming the model as
    it was spelt, for the first that names none."""

    def ids(available: Sequence[str]) -> list[str | None]:
        return [served_model(model, available) for model in models]

    available = served_models(session, settings)
    found = ids(available)
    if None in found:
        available = served_models(session, settings, fresh=True)  # a worker just started?
        found = ids(available)
    resolved: list[str] = []
    for index, (model, served) in enumerate(zip(models, found, strict=True)):
        if served is None:
            raise UnknownModelError(model, available, param=param(index))
        resolved.append(served)
    return resolved


def models_without_chat_template(session: Session, settings: Settings) -> set[str]:
    """Served models known to have no chat template (their live workers say so)."""
    within_s = settings.worker_heartbeat_s * 3
    return workers.models_without_chat_template(session, within_s=within_s)


def check_chat(
    session: Session, new_jobs: Sequence[NewJob], settings: Settings, *, param: Callable[[int], str]
) -> None:
    """Raise NoChatTemplateError for the first chat job whose model has no template."""
    if not any(new.messages for new in new_jobs):
        return
    without = models_without_chat_template(session, settings)
    for index, new in enumerate(new_jobs):
        if new.messages and new.model in without:
            raise NoChatTemplateError(new.model, param=param(index))


def check_fits(
    settings: Settings, new_jobs: Sequence[NewJob], *, prefix: Callable[[int], str]
) -> None:
    """Raise RequestTooLargeError for the first job that needs more rows or cache tokens
    than ``max_batch_size`` / ``max_tokens_in_flight`` allow: a lower bound, as the API
    does not tokenize (each row holds at least one prompt token plus its new tokens)."""
    for index, new in enumerate(new_jobs):
        params = new.params.with_defaults(settings.default_max_new_tokens)
        field = "num_beams" if params.uses_beams else "num_return_sequences"
        rows = params.num_beams if params.uses_beams else params.num_return_sequences
        if rows > settings.max_batch_size:
            message = f"{field}={rows} needs {rows} rows; a worker holds {settings.max_batch_size}"
            raise RequestTooLargeError(message, param=prefix(index) + field)
        if params.max_new_tokens is not None:
            field, per_row = "max_new_tokens", params.max_new_tokens + 1
        else:
            field, per_row = "max_length", params.max_length or 0
        if rows * per_row > settings.max_tokens_in_flight:
            message = (
                f"{field} over {rows} rows needs at least {rows * per_row} tokens of cache;"
                f" a worker holds {settings.max_tokens_in_flight} (max_tokens_in_flight)"
            )
            raise RequestTooLargeError(message, param=prefix(index) + field)


def create(
    session: Session,
    queue: JobQueue | None,
    new_jobs: Sequence[NewJob],
    *,
    settings: Settings,
    owner: str | None,
    replay: idempotency.IdempotentRequest | None,
    grouped: bool,
    param: Callable[[int], str],
    prefix: Callable[[int], str] = lambda _: "",
) -> tuple[list[dict[str, Any]], str | None]:
    """Validate, insert, commit and send ``new_jobs``; returns their rows, or no rows
    and the id an earlier request with the same idempotency key made (a job's id,
    or for ``grouped`` jobs their submission's id).

    Validation covers every door alike: served models, fit in a worker, the
    webhook egress policy for each ``callback_url`` and the owner's quota of
    queued + running jobs (a replay is answered before any of them)."""
    if replay is not None and (earlier := replay.earlier()) is not None:
        return [], earlier
    models = check_models(session, settings, [new.model for new in new_jobs], param=param)
    new_jobs = [
        dataclasses.replace(new, model=model) for new, model in zip(new_jobs, models, strict=True)
    ]
    check_chat(session, new_jobs, settings, param=param)
    check_fits(settings, new_jobs, prefix=prefix)
    egress.check_callbacks(
        ((prefix(index) + "callback_url", new.callback_url) for index, new in enumerate(new_jobs)),
        settings.webhook_allow,
    )
    quotas.check_active_jobs(
        session, owner or LOCAL_OWNER, len(new_jobs), settings.quota_active_jobs
    )
    submission_id = f"sub_{secrets.token_hex(12)}" if grouped else None
    ids = id_sequence() if grouped else iter([new_job_id()])
    now = utcnow()
    rows = [
        job_row(
            new,
            job_id=next(ids),
            owner=owner or LOCAL_OWNER,
            default_max_new_tokens=settings.default_max_new_tokens,
            now=now,
            submission_id=submission_id,
        )
        for new in new_jobs
    ]
    session.execute(insert(Job), rows)  # one multi-row INSERT, not one ORM object each
    if replay is not None:
        replay.remember(submission_id or rows[0]["id"])
    try:
        session.commit()
    except IntegrityError:
        # The same key raced in from a concurrent retry and won: answer with its jobs.
        session.rollback()
        if replay is None or (earlier := replay.earlier()) is None:
            raise
        return [], earlier
    send(queue, routes_of(rows, settings))
    return rows, None


def _replay(
    session: Session, owner: str | None, key: str | None, endpoint: str, body: Any
) -> idempotency.IdempotentRequest | None:
    return idempotency.IdempotentRequest.begin(
        session, owner=owner or LOCAL_OWNER, key=key, endpoint=endpoint, body=body
    )


def submit_job(
    session: Session,
    queue: JobQueue | None,
    body: JobCreate,
    *,
    settings: Settings,
    owner: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """``POST /v1/jobs``: commit a new job, then send it; returns it and whether it is
    a replay (an earlier request with the same idempotency key made it)."""
    replay = _replay(
        session, owner, idempotency_key, "jobs", body.model_dump(mode="json", exclude_unset=True)
    )
    new = NewJob.from_create(body, default_model=settings.model_id)
    rows, earlier = create(
        session,
        queue,
        [new],
        settings=settings,
        owner=owner,
        replay=replay,
        grouped=False,
        param=lambda _: "model",
    )
    if earlier is not None:
        return get_job(session, earlier), True
    return Job(**rows[0]), False


def submit_jobs(
    session: Session,
    queue: JobQueue | None,
    bodies: Sequence[JobCreate],
    *,
    settings: Settings,
    owner: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[list[Job], bool]:
    """``POST /v1/jobs/bulk``: commit many jobs in one transaction (all or none), then
    send them a few per message; returns them in the order given (their ids sort
    so) and whether this is a replay."""
    replay = _replay(
        session,
        owner,
        idempotency_key,
        "jobs.bulk",
        [body.model_dump(mode="json", exclude_unset=True) for body in bodies],
    )
    new_jobs = [NewJob.from_create(body, default_model=settings.model_id) for body in bodies]
    rows, earlier = create(
        session,
        queue,
        new_jobs,
        settings=settings,
        owner=owner,
        replay=replay,
        grouped=True,
        param=lambda index: f"jobs.{index}.model",
        prefix=lambda index: f"jobs.{index}.",
    )
    if earlier is not None:
        return submission_jobs(session, earlier), True
    return [Job(**row) for row in rows], False


def submit_request(
    session: Session,
    queue: JobQueue | None,
    request: ParsedRequest,
    *,
    settings: Settings,
    owner: str | None = None,
    idempotency_key: str | None = None,
    body: Any = None,
) -> tuple[str, bool]:
    """``POST /v1/completions``: commit one job for an OpenAI request, then send it;
    returns its id and whether it is a replay (``body``: the request as sent, which
    an ``Idempotency-Key`` is bound to)."""
    replay = _replay(session, owner, idempotency_key, "completions", body)
    rows, earlier = create(
        session,
        queue,
        [NewJob.from_request(request)],
        settings=settings,
        owner=owner,
        replay=replay,
        grouped=False,
        param=lambda _: "model",
    )
    if earlier is not None:
        return earlier, True
    return rows[0]["id"], False

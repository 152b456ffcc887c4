"""The bodies of webhook deliveries: a job as ``GET /v1/jobs/{id}`` returns it
(without its own ``webhook`` status), or the batch object.

Kept apart from :mod:`core.webhooks` (the outbox and the sending), which takes
:func:`build` as a callback: the outbox sits below jobs and batches, which write
to it, and must not import them back.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from core import batches
from core.models import Batch, Job, WebhookDelivery
from core.schemas import JobRead


def build(session: Session, delivery: WebhookDelivery) -> bytes | None:
    """The JSON body of ``delivery``, from the rows as they are now; None if its
    object no longer exists."""
    if delivery.job_id is not None:
        job = session.get(Job, delivery.job_id)
        if job is None:
            return None
        return JobRead.from_job(job).model_dump_json(exclude={"webhook"}).encode()
    if delivery.batch_id is not None:
        batch = session.get(Batch, delivery.batch_id)
        if batch is None:
            return None
        return json.dumps(batches.batch_object(session, batch), separators=(",", ":")).encode()
    return None

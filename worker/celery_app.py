"""The worker's Celery app, configured from settings when first used.

``celery -A worker.celery_app inspect ...`` and Flower work against it as usual.
The model is loaded once per worker process by :mod:`worker.lifecycle`, before
the worker consumes its first message; never at import.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from core.queue import celery_config
from core.settings import get_settings

app = Celery("genq", include=["worker.tasks", "worker.lifecycle"])


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))

"""The worker's Celery app, configured from settings when first used.

``celery -A worker.celery_app inspect ...`` and Flower work against it as usual.
The model is loaded once per worker process by :mod:`worker.lifecycle`, before
the worker consumes its first message; never at import.
"""

from __future__ import annotations

import warnings
from typing import Any

from celery import Celery
from celery.exceptions import SecurityWarning

from core.queue import celery_config
from core.settings import get_settings

app = Celery("genq", include=["worker.tasks", "worker.lifecycle"])


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


UNSAFE_CONTENT = frozenset({"pickle", "application/x-python-serialize", "yaml", "msgpack"})
"""Serializers that can run code or build arbitrary objects from a message."""


def quiet_root_warning(accept_content: list[str] | tuple[str, ...]) -> bool:
    """Silence Celery's "running the worker with superuser privileges" warning when,
    and only when, the worker accepts JSON alone. What it guards against is a
    message deserialized into code as root (pickle); Celery refuses to start as
    root with pickle accepted, and warns even when it is not, which in a container
    running as root (as the demo here) is noise on every start. Returns whether
    it was silenced."""
    if set(accept_content) & UNSAFE_CONTENT:
        return False
    warnings.filterwarnings(
        "ignore", category=SecurityWarning, message=r"\s*You're running the worker with superuser"
    )
    return True

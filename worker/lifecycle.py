"""Load the engine once per worker process, before it takes jobs; close it on exit.

``genq worker`` runs Celery's threads pool: one process, one copy of the weights,
and as many task threads as jobs that should share the batch. With the threads
(or solo) pool the engine is built in ``worker_init``, before the consumer
starts. Under prefork each child builds its own on first use, because
``worker_process_init`` handlers may block for only 4 seconds.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_init, worker_shutdown

from core.settings import get_settings
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class EngineLoadError(RuntimeError):
    """The model could not be loaded; the message says how to fix it."""


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, built (and the model loaded) on first call."""
    global _runtime
    with _lock:
        if _runtime is None:
            from worker.engine import build_engine

            settings = get_settings()
            try:
                engine = build_engine(settings)
            except Exception as exc:
                from worker.engine.loader import ModelLoadError

                if isinstance(exc, ModelLoadError):
                    raise EngineLoadError(str(exc)) from exc
                raise
            log.info("engine ready: %s", engine.info)
            _runtime = WorkerRuntime(settings, engine)
        return _runtime


@worker_init.connect
def _load_before_consuming(sender: Any = None, **_: Any) -> None:
    pool = getattr(sender, "pool_cls", None)
    if pool is not None and "prefork" in getattr(pool, "__module__", ""):
        return
    get_runtime()


@worker_shutdown.connect
def _close(**_: Any) -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None

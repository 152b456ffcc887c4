"""Load the engine once per worker process, before it takes jobs; drain and close it.

``genq worker`` runs Celery's threads pool: one process, one copy of the weights,
and as many task threads as jobs that should share the batch. With the threads
(or solo) pool the engine is built in ``worker_init``, before the consumer
starts. Under prefork each child builds its own on first use, because
``worker_process_init`` handlers may block for only 4 seconds.

On SIGTERM (``worker_shutting_down``) the runtime stops taking jobs; those still
running after ``GENQ_SHUTDOWN_GRACE_S`` are handed back to the queue. If the engine's
scheduler dies, the runtime hands its jobs back and leaves the registry, and the
process exits with :data:`ENGINE_DEAD_EXIT` so that its supervisor starts a new one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery.signals import worker_init, worker_shutdown, worker_shutting_down

from core.queue import get_queue
from core.settings import get_settings
from worker.dispatcher import Dispatcher
from worker.feeder import Feeder
from worker.runtime import WorkerRuntime
from worker.sweeper import Sweeper

log = logging.getLogger(__name__)


# The exit status of a worker whose engine died (EX_SOFTWARE).
ENGINE_DEAD_EXIT = 70


def _exit_engine_dead() -> None:
    log.critical("the engine died; exiting with status %d to be restarted", ENGINE_DEAD_EXIT)
    logging.shutdown()
    os._exit(ENGINE_DEAD_EXIT)  # from the monitor thread: Celery's shutdown would wait on it


class EngineLoadError(RuntimeError):
    """The model could not be loaded; the message says how to fix it."""


_runtime: WorkerRuntime | None = None
_sweeper: Sweeper | None = None
_feeder: Feeder | None = None
_dispatcher: Dispatcher | None = None
_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, built (and the model loaded) on first call."""
    global _runtime, _sweeper, _feeder, _dispatcher
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
            queue = get_queue(settings)
            name = f"{socket.gethostname()}:{os.getpid()}"
            _runtime = WorkerRuntime(settings, engine, queue, name=name)
            _runtime.on_engine_dead = _exit_engine_dead
            _runtime.heartbeat()
            _sweeper = Sweeper(settings, queue, holder=name)
            _sweeper.start()
            _feeder = Feeder(settings, queue, holder=name)
            _feeder.start()
            _dispatcher = Dispatcher(settings)
            _dispatcher.start()
        return _runtime


@worker_init.connect
def _load_before_consuming(sender: Any = None, **_: Any) -> None:
    pool = getattr(sender, "pool_cls", None)
    if pool is not None and "prefork" in getattr(pool, "__module__", ""):
        return
    get_runtime()


@worker_shutting_down.connect
def _drain(**_: Any) -> None:
    if _runtime is not None:
        _runtime.drain(_runtime.settings.shutdown_grace_s)


@worker_shutdown.connect
def _close(**_: Any) -> None:
    global _runtime, _sweeper, _feeder, _dispatcher
    with _lock:
        if _feeder is not None:
            _feeder.stop()
            _feeder = None
        if _dispatcher is not None:
            _dispatcher.stop()
            _dispatcher = None
        if _sweeper is not None:
            _sweeper.stop()
            _sweeper = None
        if _runtime is not None:
            _runtime.close()
            _runtime = None

"""The FastAPI app factory. ``uvicorn --factory api.app:create_app`` serves it."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.limits import BodySizeLimit
from api.routes import health, jobs
from core.queue import JobQueue, get_queue
from core.settings import Settings, get_settings


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    """An API app for ``settings`` (the environment's by default)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="genq",
        summary="Queued text generation: submit prompts, get job ids, read results.",
        version="0.1.0",
    )
    app.state.settings = settings
    app.state.queue = queue or get_queue(settings)
    errors.install(app)
    app.add_middleware(BodySizeLimit, limit_for=lambda _path: settings.max_body_bytes)
    app.include_router(health.router)
    app.include_router(jobs.router)
    return app

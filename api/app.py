"""The FastAPI app factory. ``uvicorn --factory api.app:create_app`` serves it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api import errors
from api.limits import BodySizeLimit
from api.routes import batches, completions, events, files, health, jobs, metrics, models, ui
from api.textguard import TextGuard
from core.queue import JobQueue, get_queue
from core.quotas import AuthFailures, RateLimiter, StreamSlots
from core.settings import Settings, get_settings

DOCS_STATIC_URL = "/docs-static"
"""Where the API docs' scripts and styles are served from."""


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    """An API app for ``settings`` (the environment's by default)."""
    settings = settings or get_settings()
    # /docs (Swagger UI) and /redoc load their scripts and styles from files shipped
    # in the fastapi-offline package, not from a CDN, so they work offline.
    app = FastAPIOffline(
        title="genq",
        summary="Queued text generation: submit prompts, get job ids, read results.",
        version="0.1.0",
        static_url=DOCS_STATIC_URL,
    )
    app.state.settings = settings
    app.state.queue = queue or get_queue(settings)
    app.state.rate_limiter = RateLimiter(
        settings.quota_requests_per_s, settings.quota_request_burst
    )
    app.state.streams = StreamSlots(settings.quota_streams)
    app.state.auth_failures = AuthFailures(
        settings.quota_auth_failures_per_s, settings.quota_auth_failure_burst
    )
    errors.install(app)
    app.add_middleware(TextGuard)  # inside BodySizeLimit: it reads bounded bodies only
    app.add_middleware(BodySizeLimit, limit_for=lambda path: _body_limit(settings, path))
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(metrics.router)
    app.include_router(ui.router)
    app.mount("/ui/static", ui.static_files(), name="ui-static")
    app.include_router(models.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(completions.router)
    return app


MULTIPART_SLACK = 64 * 1024


def _body_limit(settings: Settings, path: str) -> int:
    """Uploads may be as large as ``max_file_bytes`` (plus the multipart framing)."""
    if path.rstrip("/") == "/v1/files":
        return settings.max_file_bytes + MULTIPART_SLACK
    return settings.max_body_bytes

"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import QueueDep, SettingsDep
from core.health import check_broker, check_database

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(settings: SettingsDep, queue: QueueDep) -> JSONResponse:
    """Whether the database and the broker are reachable, and which one is not."""
    checks = {
        "database": check_database(settings.resolved_database_url),
        "broker": check_broker(queue),
    }
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)

"""/ui: a status page of recent jobs and batches (static HTML, CSS and vanilla JS).

The page reads the JSON API itself (``/v1/jobs``, ``/v1/batches``), sending the API
key the user typed (kept in the browser's localStorage) when auth is on, so
serving it needs no key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/ui")
def ui() -> FileResponse:
    """The status page."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/")
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


def static_files() -> StaticFiles:
    """The page's assets, to mount at ``/ui/static``."""
    return StaticFiles(directory=STATIC_DIR)

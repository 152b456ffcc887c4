"""What the ``genq`` commands share: the consoles, the embedded migration, and
polling a job over HTTP. Imported by cli.main and the subcommand modules alike,
so none of them imports cli.main back (no import cycle)."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from sqlalchemy.engine import make_url

import migrations
from core.settings import get_settings

FINAL = ("succeeded", "failed", "cancelled")
console = Console()
err = Console(stderr=True)


def migrate_embedded() -> None:
    """On the embedded default (SQLite), bring the schema up to date on start.

    ``genq api`` and ``genq worker`` often start together: a file lock makes the
    second wait for the first instead of both creating the same tables.
    """
    settings = get_settings()
    url = settings.resolved_database_url
    if not url.startswith("sqlite"):
        return
    database = Path(make_url(url).database or settings.data_dir / "memory")
    database.parent.mkdir(parents=True, exist_ok=True)
    with database.with_name(database.name + ".migrate-lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        migrations.upgrade(url)


def fail_http(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        err.print(f"[red]error {response.status_code}[/red] {error['code']}: {error['message']}")
    except (ValueError, KeyError, TypeError):
        err.print(f"[red]error {response.status_code}[/red] {response.text[:500]}")
    raise typer.Exit(1)


def wait_for_job(client: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    """Poll a job until it reaches a final status or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        fail_http(response)
        job: dict[str, Any] = response.json()
        if job["status"] in FINAL or time.monotonic() > deadline:
            return job
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)

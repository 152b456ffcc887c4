"""The HTTP client of the ``genq`` commands that talk to the API (submit, status).

A connection failure is the first thing a newcomer meets (the API is not started,
or listens on another port): it ends the command with one line naming the URL
tried and how to change it, not a transport traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import typer
from rich.console import Console

from core.settings import get_settings

err = Console(stderr=True, soft_wrap=True)

UNREACHABLE_EXIT = 2
"""The exit status when the API cannot be reached (1 is a job that failed)."""


def unreachable_message(url: str, exc: httpx.TransportError) -> str:
    """One line: what was tried, why it failed, and how to point genq elsewhere."""
    reason = str(exc) or type(exc).__name__
    return (
        f"error: cannot reach the genq API at {url} ({reason}); start it with `genq api`, "
        "or point GENQ_API_URL (or --api-url) at where it listens"
    )


@contextlib.contextmanager
def api_client(api_url: str | None) -> Iterator[httpx.Client]:
    """An httpx client for the API (``api_url``, else GENQ_API_URL) sending GENQ_API_KEY;
    a transport error anywhere inside the block exits with :func:`unreachable_message`."""
    settings = get_settings()
    url = api_url or settings.api_url
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            yield client
    except httpx.TransportError as exc:
        err.print(unreachable_message(url, exc), highlight=False, markup=False)
        raise typer.Exit(UNREACHABLE_EXIT) from None

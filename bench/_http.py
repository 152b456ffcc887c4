"""A lean HTTP/1.1 keep-alive client for submitting many jobs at once.

httpx costs about 9 ms of CPU per request here, more than the API spends serving it;
on a 2-core machine the benchmark's own client would then be the bottleneck. This
client writes each request as bytes on a few persistent connections and parses only
the status line, ``Content-Length`` and the JSON body: well under 1 ms per request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

RETRIES = 25


class HTTPError(RuntimeError):
    """A request got a status other than the expected one."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server keeps the connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, keep_alive = 0, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep_alive = False
        elif name == "transfer-encoding":
            raise HTTPError("chunked responses are not supported by this client")
    body = await reader.readexactly(length) if length else b""
    return status, body, keep_alive


async def _post_many(
    url: str, path: str, bodies: Sequence[dict[str, Any]], connections: int, expect: int
) -> tuple[list[dict[str, Any]], int]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    results: list[dict[str, Any] | None] = [None] * len(bodies)
    retried = [0]
    work: Iterator[int] = iter(range(len(bodies)))
    prefix = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: "
    ).encode()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for index in work:  # shared iterator: each body is taken once
                payload = json.dumps(bodies[index]).encode()
                request = prefix + str(len(payload)).encode() + b"\r\n\r\n" + payload
                for attempt in range(RETRIES + 1):
                    writer.write(request)
                    status, body, keep_alive = await _read_response(reader)
                    if status != 503 or attempt == RETRIES:
                        break
                    retried[0] += 1  # the API's "retry shortly" (database or broker busy)
                    await asyncio.sleep(0.2)
                if status != expect:
                    raise HTTPError(f"POST {path}: {status} {body[:300]!r}")
                results[index] = json.loads(body)
                if not keep_alive:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(min(connections, len(bodies)))))
    return [r for r in results if r is not None], retried[0]


def post_many(
    url: str,
    path: str,
    bodies: Sequence[dict[str, Any]],
    *,
    connections: int = 64,
    expect: int = 202,
) -> tuple[list[dict[str, Any]], int]:
    """POST every body as JSON to ``url + path`` over ``connections`` keep-alive
    connections; returns the decoded responses in the order of ``bodies`` and how many
    503 answers were retried (up to ``RETRIES`` per request, 0.2 s apart)."""
    return asyncio.run(_post_many(url, path, bodies, connections, expect))

"""Refuse, with a 422 naming the field, any text a database cannot store.

Every string a JSON client sends (prompts, stop strings, ``custom_id``, metadata
keys and values, model names, ...) and every path and query parameter is stored
or compared in SQL; NUL and lone surrogates make that fail (:mod:`core.text`).
Checking here, once, covers every route and every field, present and future,
instead of a validator on each. It costs a regex scan of the raw body; a body is
decoded a second time only when that scan finds a suspicious escape.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import send_error
from core import text


class TextGuard:
    """ASGI middleware: a 422 for unstorable text in the path, query or JSON body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (found := _in_path_or_query(scope)) is not None:
            await _reject(send, *found)
            return
        content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
        if content_type.startswith(b"multipart/"):  # uploads: streamed, checked where used
            await self.app(scope, receive, send)
            return
        # Any other body may be decoded as JSON (FastAPI also reads ``+json`` types,
        # and may read a body with no type): read it whole (BodySizeLimit, outside,
        # bounds it), check it, then hand the same bytes on.
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if text.may_hold_unstorable(body) and (found := _in_json(body)) is not None:
            await _reject(send, *found)
            return
        await self.app(scope, _replay([body], None, receive), send)


def _in_path_or_query(scope: Scope) -> tuple[str, str] | None:
    if (reason := text.unstorable_reason(scope.get("path", ""))) is not None:
        return "path", reason
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        for item in (name, value):
            if (reason := text.unstorable_reason(item)) is not None:
                return text.storable(name, 64), reason
    return None


def _in_json(body: bytes) -> tuple[str, str] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the route's own parsing answers
    return text.first_unstorable(data)


def _replay(bodies: list[bytes], first: Message | None, receive: Receive) -> Receive:
    """A receive that gives the body already read, then defers to ``receive``."""
    pending: list[Message] = [first] if first is not None else []
    pending += [{"type": "http.request", "body": b, "more_body": False} for b in bodies]

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _reject(send: Send, param: str, reason: str) -> None:
    await send_error(send, 422, "invalid_text", f"{param}: {reason}", param)

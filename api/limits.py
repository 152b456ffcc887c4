"""A request-body size limit, enforced before a handler reads the body."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import send_error


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once a body streams past its limit. An HTTPException
    so that FastAPI, which turns other errors while reading a body into a 400,
    lets it through (the handler answers 413 if this middleware does not)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


class BodySizeLimit:
    """Answer 413 with a JSON error when a request body exceeds its path's limit.

    ``limit_for(path)`` gives the limit in bytes (uploads may allow more than JSON).
    Both a declared Content-Length and the bytes actually streamed are checked.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, limit)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if not started:
                await _reject(send, limit)


async def _reject(send: Send, limit: int) -> None:
    await send_error(send, 413, "request_too_large", too_large_message(limit))

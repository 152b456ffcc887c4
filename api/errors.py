"""Errors are part of the interface: every 4xx is ``{"error": {code, message, param}}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from core.db import is_transient
from core.egress import CallbackRefusedError
from core.errors import ConflictError, CoreError, InvalidRequestError, NotFoundError, TooLargeError
from core.quotas import PriorityNotAllowedError, QuotaExceededError, retry_after_header
from core.submit import NoChatTemplateError, RequestTooLargeError, UnknownModelError
from core.text import UnstorableTextError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error to answer with ``status`` and a JSON body."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


def error_body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, **extra}}


async def send_error(
    send: Send, status: int, code: str, message: str, param: str | None = None
) -> None:
    """Answer with the JSON error body from ASGI middleware (below FastAPI's handlers)."""
    body = json.dumps(error_body(code, message, param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _param(loc: tuple[Any, ...]) -> str | None:
    # ("body", "max_new_tokens") -> "max_new_tokens"; ("query", "limit") -> "limit"
    parts = [str(p) for p in loc[1:]]
    return ".".join(parts) or None


def _validation_message(err: dict[str, Any]) -> str:
    message = str(err.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    status, code = 422, "invalid_request"
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx")
        reason = ctx.get("error", "malformed") if isinstance(ctx, dict) else "malformed"
        at = first.get("loc", ("body", 0))[-1]
        message = f"the request body is not valid JSON ({reason} at character {at})"
        return JSONResponse(error_body("invalid_json", message), status_code=400)
    details = [
        {"param": _param(tuple(e.get("loc", ()))), "message": _validation_message(e)}
        for e in errors
    ]
    param = _param(tuple(first.get("loc", ())))
    message = _validation_message(first)
    if param:
        message = f"{param}: {message}"
    return JSONResponse(error_body(code, message, param, details=details), status_code=status)


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message, exc.param), status_code=exc.status)


# Each kind of core error and its HTTP status: the one place core meets HTTP.
STATUS_OF: tuple[tuple[type[CoreError], int], ...] = (
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidRequestError, 400),
    (TooLargeError, 413),
    (UnknownModelError, 422),
    (RequestTooLargeError, 422),
    (NoChatTemplateError, 422),
    (CallbackRefusedError, 422),
    (UnstorableTextError, 422),
    (QuotaExceededError, 429),
    (PriorityNotAllowedError, 403),
)


def status_of(exc: CoreError) -> int:
    """The HTTP status for a core error (422 for one of no listed kind)."""
    return next((status for kind, status in STATUS_OF if isinstance(exc, kind)), 422)


async def _on_core_error(_: Request, exc: CoreError) -> JSONResponse:
    headers = None
    if isinstance(exc, QuotaExceededError):  # when the owner may try again
        headers = {"Retry-After": retry_after_header(exc.retry_after_s)}
    body = error_body(exc.code, exc.message, exc.param)
    return JSONResponse(body, status_code=status_of(exc), headers=headers)


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    code = codes.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


async def _on_database_error(_: Request, exc: SQLAlchemyError) -> JSONResponse:
    if is_transient(exc):
        body = error_body("database_unavailable", "the database is unreachable; retry shortly")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
    log.error("database error", exc_info=exc)
    return JSONResponse(error_body("internal_error", "internal database error"), status_code=500)


def install(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(CoreError, _on_core_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(SQLAlchemyError, _on_database_error)  # type: ignore[arg-type]

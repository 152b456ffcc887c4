"""Typed errors raised by core; ``api/errors.py`` maps each kind to an HTTP status
in one place, so core never speaks HTTP and the API never guesses."""

from __future__ import annotations


class CoreError(Exception):
    """A request core cannot serve, with a stable ``code`` and the field at fault."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class NotFoundError(CoreError, LookupError):
    """No such object, or not visible to the caller (HTTP 404)."""

    code = "not_found"


class ConflictError(CoreError):
    """The object's status does not allow the operation (HTTP 409)."""

    code = "conflict"


class InvalidRequestError(CoreError, ValueError):
    """The request is well-formed but its content is not acceptable (HTTP 400)."""


class TooLargeError(CoreError, ValueError):
    """The upload is over a size limit (HTTP 413)."""

    code = "too_large"

"""Text every database can store, and the first field that is not.

PostgreSQL refuses NUL (U+0000) in ``text`` and ``json`` values, and no database
driver can encode a lone UTF-16 surrogate (U+D800..U+DFFF, which JSON's ``\\ud800``
escape produces) as UTF-8; either made an insert fail with a 500. Every other
character, control characters included, is stored and returned exactly. So text
from callers is refused (4xx naming the field) only for those two, and genq's own
messages that quote something foreign are made storable (:func:`storable`).
"""

from __future__ import annotations

import re
from typing import Any

from core.errors import CoreError

# NUL or a surrogate code point (never valid in a str bound for UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# In raw JSON, the escapes that decode to those: \u0000 and \uD8xx..\uDFxx (a
# preceding escaped backslash is not counted: it only makes this a false alarm), and
# a surrogate encoded as UTF-8 bytes (ED A0..BF: not UTF-8, but json.loads decodes
# bytes with "surrogatepass", so it becomes one).
_JSON_ESCAPES = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\xed[\xa0-\xbf]")


def unstorable_reason(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None if it can."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return "must not contain NUL (U+0000) characters"
    return "must not contain unpaired UTF-16 surrogates (U+D800..U+DFFF)"


def may_hold_unstorable(raw_json: bytes) -> bool:
    """A fast pre-check of a raw JSON document: False means no string in it can be
    unstorable (no escape that decodes to one), so it need not be walked."""
    # JSON may come in UTF-16 or UTF-32 (json.loads detects them), whose bytes
    # interleave NULs with the escapes: walk any document holding a NUL byte or a BOM.
    if b"\x00" in raw_json or raw_json.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return True
    if b"\\u" not in raw_json and b"\xed" not in raw_json:  # a byte search: the usual case
        return False
    return _JSON_ESCAPES.search(raw_json) is not None


def first_unstorable(value: Any) -> tuple[str, str] | None:
    """The dotted path (``jobs.3.prompt``, ``metadata.<key>``) and reason of the first
    unstorable string in a decoded JSON value, keys included; None if all are fine.
    Iterative, so a deeply nested value cannot exhaust the stack."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if (reason := unstorable_reason(item)) is not None:
                return ".".join(path), reason
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if (reason := unstorable_reason(key)) is not None:
                    return ".".join((*path, "<key>")), f"keys {reason}"
                stack.append(((*path, key), child))
        elif isinstance(item, list):
            stack.extend(((*path, str(i)), child) for i, child in reversed(list(enumerate(item))))
    return None


def storable(value: str, limit: int = 1000) -> str:
    """``value`` cut to ``limit`` characters with NUL and surrogates replaced, for
    genq's own messages (errors that quote an exception, a file line, ...)."""
    return _UNSTORABLE.sub("\ufffd", value[:limit])


class UnstorableTextError(CoreError, ValueError):
    """A caller's text that cannot be stored; ``param`` names the field (HTTP 422
    ``invalid_text``)."""

    code = "invalid_text"

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}", param=param)
        self.reason = reason


def check(value: str, param: str) -> str:
    """``value`` unchanged, or :class:`UnstorableTextError` naming ``param``."""
    if (reason := unstorable_reason(value)) is not None:
        raise UnstorableTextError(param, reason)
    return value


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether a decoded JSON value nests arrays/objects more than ``limit`` deep
    (iterative, stops at the first branch too deep)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False

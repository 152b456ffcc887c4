"""Signatures per the Standard Webhooks spec (standardwebhooks.com), beside genq's
own ``Genq-Signature``, so receivers can verify with an off-the-shelf library
(``standardwebhooks`` on PyPI, and its ports to other languages)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"


def standard_key(secret: str) -> bytes:
    """The HMAC key Standard Webhooks libraries derive from ``secret``: the base64
    after ``whsec_`` (genq's secrets are hex, which is valid base64), else the
    secret's own bytes (a ``GENQ_WEBHOOK_SECRET`` that is not base64)."""
    tail = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(tail, validate=True) if tail else secret.encode()
    except ValueError:  # binascii.Error: not base64
        return secret.encode()


def standard_signature(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature`` per the Standard Webhooks spec: space-separated
    ``v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>``, one per secret."""
    message = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1,"
        + base64.b64encode(hmac.new(standard_key(s), message, hashlib.sha256).digest()).decode()
        for s in secrets_
    )

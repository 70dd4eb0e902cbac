"""The validator's seal on a ValidatedPlan: an HMAC over the plan's canonical JSON.

The key is drawn once per process and never leaves it, so a seal proves "the validator issued
this plan in this process, and nothing in it changed since". A plan that crosses a process
boundary (a file, HTTP, pickle) is validated again where it is used. This guards against
mistakes and casual forgery (model_copy, model_construct, a JSON round trip); it is no defence
against code in the same process that goes looking for the key.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

_KEY = secrets.token_bytes(32)

# Handed by the validator to ValidatedPlan's constructor: nothing else may build one.
ISSUER = object()


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes a seal covers: sorted keys, no whitespace, so equal content gives equal bytes."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(payload: bytes) -> str:
    """The seal of these bytes under this process's key."""
    return hmac.new(_KEY, payload, hashlib.sha256).hexdigest()


def matches(payload: bytes, mac: str) -> bool:
    """Whether `mac` is this process's seal of `payload` (constant-time comparison)."""
    return isinstance(mac, str) and hmac.compare_digest(sign(payload), mac)

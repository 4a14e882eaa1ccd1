"""Webhook signatures (CONTRACT §6): sign outgoing bodies, and verify them for ``webhookd sink``.

- ``hmac-sha256`` (Stripe-compatible): ``<signature_header>: t=<ts>,v1=<hex>[,v1=<hex>...]``, HMAC-SHA256
  keyed with the secret's whole UTF-8 string over ``b"<ts>." + body``; one ``v1`` per secret.
- ``standard-webhooks``: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<b64>[ v1,<b64>...]``
  over ``b"<id>.<ts>." + body``, keyed with the base64-decoded part of the secret after ``whsec_``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from webhookd.config import EndpointConfig

__all__ = [
    "SECRET_PREFIX",
    "gen_secret",
    "hmac_sha256_header",
    "signature_headers",
    "standard_key",
    "standard_signature_header",
    "verify_hmac_sha256",
    "verify_standard",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


# Seconds a signature's timestamp may be off, either way (the sink and the hub check it; as common receivers do).
TOLERANCE = 300.0


def gen_secret() -> str:
    """A new secret usable with both schemes: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode("ascii")


def standard_key(secret: str) -> bytes:
    """The Standard Webhooks HMAC key of ``secret``: base64 of the part after ``whsec_``.

    Missing padding is tolerated (as the reference library does). Raises ``ValueError`` when it is not base64
    or decodes to nothing.
    """
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("standard-webhooks secret must be whsec_<base64>") from e
    if not key:
        raise ValueError("standard-webhooks secret is empty")
    return key


def _hmac_hex(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii"), hashlib.sha256)
    mac.update(body)
    return mac.hexdigest()


def _standard_digest(key: bytes, event_id: str, timestamp: int, body: bytes) -> bytes:
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.digest()


def hmac_sha256_header(secrets: Sequence[str], body: bytes, timestamp: int) -> str:
    """The value ``t=<ts>,v1=<hex>[,v1=<hex>...]`` (one ``v1`` per secret)."""
    parts = [f"t={timestamp}"]
    parts.extend(f"v1={_hmac_hex(s, timestamp, body)}" for s in secrets)
    return ",".join(parts)


def standard_signature_header(secrets: Sequence[str], event_id: str, body: bytes, timestamp: int) -> str:
    """The value ``v1,<b64>[ v1,<b64>...]`` (one per secret)."""
    return " ".join(
        "v1," + base64.b64encode(_standard_digest(standard_key(s), event_id, timestamp, body)).decode("ascii")
        for s in secrets
    )


def signature_headers(endpoint: EndpointConfig, event_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The signature headers of one attempt (call on every attempt with a fresh ``timestamp``).

    ``{}`` for ``signature: none`` or when the endpoint has no secrets. The standard-webhooks names are
    lowercase (``webhook-id`` ...): merge them case-insensitively with the other request headers, since
    ``webhook-id`` and ``Webhook-Id`` are the same HTTP header (same value: the event id).
    """
    scheme = endpoint.signature
    if scheme == "none" or not endpoint.secrets:
        return {}
    if scheme == "hmac-sha256":
        return {endpoint.signature_header: hmac_sha256_header(endpoint.secrets, body, timestamp)}
    if scheme == "standard-webhooks":
        return {
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": standard_signature_header(endpoint.secrets, event_id, body, timestamp),
        }
    raise ValueError(f"unknown signature scheme {scheme!r}")


def _fresh(timestamp: int, tolerance: float, now: float) -> bool:
    return abs(now - timestamp) <= tolerance


def verify_hmac_sha256(header: str, body: bytes, secrets: Sequence[str], tolerance: float, now: float) -> bool:
    """True when ``header`` (``t=..,v1=..``) carries a valid ``v1`` for any of ``secrets`` and ``t`` is
    within ``tolerance`` seconds of ``now`` (either direction; pass ``math.inf`` to skip the time check)."""
    timestamp: int | None = None
    given: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            given.append(value.strip().lower())
    if timestamp is None or not given or not _fresh(timestamp, tolerance, now):
        return False
    ok = False
    for secret in secrets:
        expected = _hmac_hex(secret, timestamp, body)
        for sig in given:
            # compare_digest on ASCII bytes; a non-ASCII header value simply does not match
            ok |= hmac.compare_digest(expected.encode("ascii"), sig.encode("utf-8", "replace"))
    return ok


def verify_standard(
    headers: Mapping[str, str], body: bytes, secrets: Sequence[str], tolerance: float, now: float
) -> bool:
    """True when the ``webhook-*`` headers (names matched case-insensitively) carry a valid ``v1`` signature
    for any of ``secrets`` and ``webhook-timestamp`` is within ``tolerance`` seconds of ``now``."""
    lower = {k.lower(): v for k, v in headers.items()}
    event_id = lower.get("webhook-id")
    ts_raw = lower.get("webhook-timestamp")
    sig_raw = lower.get("webhook-signature")
    if not (event_id and ts_raw and sig_raw):
        return False
    try:
        timestamp = int(ts_raw.strip())
    except ValueError:
        return False
    if not _fresh(timestamp, tolerance, now):
        return False
    given: list[bytes] = []
    for item in sig_raw.split():
        version, sep, b64 = item.partition(",")
        if not sep or version != "v1":
            continue
        try:
            given.append(base64.b64decode(b64, validate=True))
        except (binascii.Error, ValueError):
            continue
    if not given:
        return False
    ok = False
    for secret in secrets:
        try:
            key = standard_key(secret)
        except ValueError:
            continue
        expected = _standard_digest(key, event_id, timestamp, body)
        for sig in given:
            ok |= hmac.compare_digest(expected, sig)
    return ok

"""Signatures (CONTRACT §6), verified independently with the stripe and standardwebhooks libraries."""

from __future__ import annotations

import base64
import math
import time
from typing import Any

import pytest
import standardwebhooks
import stripe

from webhookd.config import EndpointConfig
from webhookd.signing import (
    gen_secret,
    signature_headers,
    standard_key,
    verify_hmac_sha256,
    verify_standard,
)


def make_endpoint(**overrides: Any) -> EndpointConfig:
    fields: dict[str, Any] = {
        "name": "ops-bridge",
        "url": "https://hooks.example.com/devices",
        "events": frozenset({"online", "offline"}),
    }
    return EndpointConfig(**{**fields, **overrides})


BODY = '{"id":"evt_1","type":"device.online","device":{"id":"printer-1","name":"Küche ☕"}}'.encode()
EID = "evt_0123456789abcdef0123456789abcdef"
HMAC_SECRETS = ("plain-secret-1", "whsec_c2Vjb25kLXNlY3JldA==")  # whsec_ one is used as a whole string
STD_SECRETS = (
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "whsec_" + base64.b64encode(b"\x00\x01second key bytes\xff" * 2).decode(),
)


def now() -> int:
    return int(time.time())


# --- hmac-sha256 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("secrets", [HMAC_SECRETS[:1], HMAC_SECRETS])
def test_hmac_verifies_with_stripe(secrets: tuple[str, ...]) -> None:
    endpoint = make_endpoint(signature="hmac-sha256", secrets=secrets)
    ts = now()
    headers = signature_headers(endpoint, EID, BODY, ts)
    assert list(headers) == ["Webhookd-Signature"]
    header = headers["Webhookd-Signature"]
    parts = header.split(",")
    assert parts[0] == f"t={ts}"
    assert len(parts) == 1 + len(secrets) and all(p.startswith("v1=") for p in parts[1:])
    for secret in secrets:  # each secret verifies on its own (rotation)
        assert stripe.WebhookSignature.verify_header(BODY.decode(), header, secret, tolerance=300)
        assert verify_hmac_sha256(header, BODY, [secret], 300, time.time())
    assert verify_hmac_sha256(header, BODY, ["unrelated", *secrets], 300, time.time())


def test_hmac_custom_header_name() -> None:
    endpoint = make_endpoint(signature="hmac-sha256", secrets=("k",), signature_header="Biotz-IoT-Signature")
    headers = signature_headers(endpoint, EID, BODY, now())
    assert list(headers) == ["Biotz-IoT-Signature"]


def test_hmac_known_answer() -> None:
    # HMAC-SHA256(key=b"secret", msg=b"1700000000.{}") -- fixed vector guards the exact construction
    endpoint = make_endpoint(signature="hmac-sha256", secrets=("secret",))
    header = signature_headers(endpoint, EID, b"{}", 1700000000)["Webhookd-Signature"]
    expected = stripe.WebhookSignature.generate_signature_header("{}", "secret", timestamp=1700000000)
    assert header == expected


def test_hmac_stripe_rejects_tampering_and_wrong_secret() -> None:
    endpoint = make_endpoint(signature="hmac-sha256", secrets=HMAC_SECRETS)
    header = signature_headers(endpoint, EID, BODY, now())["Webhookd-Signature"]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(BODY.decode() + " ", header, HMAC_SECRETS[0], tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(BODY.decode(), header, "wrong", tolerance=300)
    stale = signature_headers(endpoint, EID, BODY, now() - 3600)["Webhookd-Signature"]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(BODY.decode(), stale, HMAC_SECRETS[0], tolerance=300)


def test_verify_hmac_accepts_stripe_generated_header() -> None:
    ts = now()
    header = stripe.WebhookSignature.generate_signature_header(BODY.decode(), "stripe-made", timestamp=ts)
    assert verify_hmac_sha256(header, BODY, ["stripe-made"], 300, ts)


def test_verify_hmac_negative() -> None:
    ts = 1_800_000_000
    endpoint = make_endpoint(signature="hmac-sha256", secrets=HMAC_SECRETS)
    header = signature_headers(endpoint, EID, BODY, ts)["Webhookd-Signature"]
    assert verify_hmac_sha256(header, BODY, HMAC_SECRETS, 300, ts + 300)
    assert not verify_hmac_sha256(header, BODY + b" ", HMAC_SECRETS, 300, ts)  # tampered body
    assert not verify_hmac_sha256(header, BODY, ["wrong"], 300, ts)  # wrong secret
    assert not verify_hmac_sha256(header, BODY, [], 300, ts)  # no secret
    assert not verify_hmac_sha256(header, BODY, HMAC_SECRETS, 300, ts + 301)  # stale
    assert not verify_hmac_sha256(header, BODY, HMAC_SECRETS, 300, ts - 301)  # from the future
    assert verify_hmac_sha256(header, BODY, HMAC_SECRETS, math.inf, ts + 10**9)  # tolerance disabled
    forged_t = header.replace(f"t={ts}", f"t={ts + 1}")
    assert not verify_hmac_sha256(forged_t, BODY, HMAC_SECRETS, 300, ts)  # timestamp is signed
    for bad in ("", "garbage", f"t={ts}", "v1=abcd", f"t=x,{header.split(',')[1]}", f"t={ts},v1=é"):
        assert not verify_hmac_sha256(bad, BODY, HMAC_SECRETS, 300, ts)


# --- standard-webhooks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("secrets", [STD_SECRETS[:1], STD_SECRETS])
def test_standard_verifies_with_standardwebhooks(secrets: tuple[str, ...]) -> None:
    endpoint = make_endpoint(signature="standard-webhooks", secrets=secrets)
    ts = now()
    headers = signature_headers(endpoint, EID, BODY, ts)
    assert headers["webhook-id"] == EID
    assert headers["webhook-timestamp"] == str(ts)
    sigs = headers["webhook-signature"].split(" ")
    assert len(sigs) == len(secrets) and all(s.startswith("v1,") for s in sigs)
    for secret in secrets:
        payload = standardwebhooks.Webhook(secret).verify(BODY, headers)
        assert payload["device"]["name"] == "Küche ☕"
        assert verify_standard(headers, BODY, [secret], 300, time.time())
    # header names are matched case-insensitively
    upper = {k.title(): v for k, v in headers.items()}
    assert verify_standard(upper, BODY, secrets, 300, time.time())


def test_standard_library_rejects_tampering_and_wrong_secret() -> None:
    endpoint = make_endpoint(signature="standard-webhooks", secrets=STD_SECRETS[:1])
    headers = signature_headers(endpoint, EID, BODY, now())
    wh = standardwebhooks.Webhook(STD_SECRETS[0])
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        wh.verify(BODY + b" ", headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(STD_SECRETS[1]).verify(BODY, headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        wh.verify(BODY, {**headers, "webhook-id": "evt_other"})  # the id is signed
    stale = signature_headers(endpoint, EID, BODY, now() - 3600)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        wh.verify(BODY, stale)


def test_verify_standard_accepts_library_signature() -> None:
    from datetime import UTC, datetime

    ts = now()
    sig = standardwebhooks.Webhook(STD_SECRETS[0]).sign(EID, datetime.fromtimestamp(ts, UTC), BODY.decode())
    headers = {"Webhook-Id": EID, "Webhook-Timestamp": str(ts), "Webhook-Signature": sig}
    assert verify_standard(headers, BODY, STD_SECRETS, 300, ts)


def test_verify_standard_negative() -> None:
    ts = 1_800_000_000
    endpoint = make_endpoint(signature="standard-webhooks", secrets=STD_SECRETS)
    headers = signature_headers(endpoint, EID, BODY, ts)
    assert verify_standard(headers, BODY, STD_SECRETS, 300, ts)
    assert not verify_standard(headers, BODY + b"x", STD_SECRETS, 300, ts)  # tampered body
    assert not verify_standard(headers, BODY, [gen_secret()], 300, ts)  # wrong secret
    assert not verify_standard(headers, BODY, ["not base64 !!"], 300, ts)  # unusable secret
    assert not verify_standard(headers, BODY, STD_SECRETS, 300, ts + 301)  # stale
    assert not verify_standard(headers, BODY, STD_SECRETS, 300, ts - 301)  # from the future
    assert not verify_standard({**headers, "webhook-id": "evt_x"}, BODY, STD_SECRETS, 300, ts)
    assert not verify_standard({**headers, "webhook-timestamp": str(ts + 1)}, BODY, STD_SECRETS, 300, ts)
    for key in headers:
        missing = {k: v for k, v in headers.items() if k != key}
        assert not verify_standard(missing, BODY, STD_SECRETS, 300, ts)
    first = headers["webhook-signature"].split(" ")[0]
    for bad_sig in ("", "v1", "v2," + first[3:], "v1,@@@", "v1,", first[:-4] + "AAA="):
        assert not verify_standard({**headers, "webhook-signature": bad_sig}, BODY, STD_SECRETS, 300, ts)
    assert not verify_standard({**headers, "webhook-timestamp": "soon"}, BODY, STD_SECRETS, 300, ts)


def test_standard_key() -> None:
    assert standard_key("whsec_" + base64.b64encode(b"abc").decode()) == b"abc"
    assert standard_key("whsec_YWJjZA") == b"abcd"  # unpadded base64 tolerated, like the library
    for bad in ("whsec_", "whsec_!!!!", ""):
        with pytest.raises(ValueError):
            standard_key(bad)


# --- none / misc -----------------------------------------------------------------------------------------


def test_none_and_no_secrets_give_no_headers() -> None:
    assert signature_headers(make_endpoint(signature="none", secrets=("x",)), EID, BODY, now()) == {}
    assert signature_headers(make_endpoint(signature="hmac-sha256"), EID, BODY, now()) == {}
    with pytest.raises(ValueError):
        signature_headers(make_endpoint(signature="rsa", secrets=("x",)), EID, BODY, now())


def test_fresh_timestamp_changes_signature() -> None:
    endpoint = make_endpoint(signature="hmac-sha256", secrets=("k",))
    a = signature_headers(endpoint, EID, BODY, 1_800_000_000)
    b = signature_headers(endpoint, EID, BODY, 1_800_000_005)
    assert a != b


def test_gen_secret() -> None:
    secrets = {gen_secret() for _ in range(50)}
    assert len(secrets) == 50
    for s in secrets:
        assert s.startswith("whsec_")
        assert len(base64.b64decode(s[6:], validate=True)) == 32
        assert standard_key(s) == base64.b64decode(s[6:])
    # one generated secret works for both schemes
    s = gen_secret()
    ts = now()
    for scheme in ("hmac-sha256", "standard-webhooks"):
        endpoint = make_endpoint(signature=scheme, secrets=(s,))
        headers = signature_headers(endpoint, EID, BODY, ts)
        if scheme == "hmac-sha256":
            stripe.WebhookSignature.verify_header(BODY.decode(), headers["Webhookd-Signature"], s, tolerance=300)
        else:
            standardwebhooks.Webhook(s).verify(BODY, headers)

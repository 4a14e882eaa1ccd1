"""``webhookd sink``: a local webhook receiver for trying integrations (CONTRACT §2).

Accepts ``POST`` on any path, answers ``200 {"ok": true}`` and prints one block per webhook to stdout: time,
path, ``Webhook-Id``, ``Webhook-Attempt``, event type, whether the signature verifies, then the body as pretty
JSON. The scheme is recognised from the request: a ``webhook-signature`` header means Standard Webhooks; a
header (any name: ``Webhookd-Signature``, ``Biotz-IoT-Signature``...) whose value looks like ``t=...,v1=...``
means hmac-sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TextIO

from aiohttp import web

from webhookd.config import HostPort
from webhookd.signing import TOLERANCE

__all__ = ["TOLERANCE", "check_signature", "describe_event", "format_block", "run_sink"]

MAX_BODY = 16 * 1024 * 1024
MAX_SHOWN = 64 * 1024  # characters of a non-JSON body printed


def _find_hmac_header(headers: Mapping[str, str]) -> tuple[str, str] | None:
    for name, value in headers.items():
        v = value.strip()
        if v.startswith("t=") and "v1=" in v:
            return name, v
    return None


def check_signature(headers: Mapping[str, str], body: bytes, secrets: Sequence[str], now: float | None = None) -> str:
    """The signature status line (without ``signature: ``): ``ok (hmac-sha256)``, ``ok (standard-webhooks)``,
    ``INVALID (...)``, ``not checked (no --secret)`` or ``missing``."""
    from webhookd import signing

    at = time.time() if now is None else now
    lower = {k.lower(): v for k, v in headers.items()}
    if "webhook-signature" in lower:
        scheme = "standard-webhooks"
        if not secrets:
            return "not checked (no --secret)"

        def verify(tolerance: float) -> bool:
            return signing.verify_standard(lower, body, secrets, tolerance, at)

        where = "webhook-signature"
    else:
        found = _find_hmac_header(headers)
        if found is None:
            return "missing"
        scheme = "hmac-sha256"
        if not secrets:
            return "not checked (no --secret)"
        where, value = found

        def verify(tolerance: float) -> bool:
            return signing.verify_hmac_sha256(value, body, secrets, tolerance, at)

    try:
        if verify(TOLERANCE):
            return f"ok ({scheme})"
        if verify(math.inf):
            return f"INVALID ({scheme} in {where}: timestamp more than {TOLERANCE:g} s away from now)"
    except Exception as e:  # a malformed header must not take the sink down
        return f"INVALID ({scheme} in {where}: {e})"
    return f"INVALID ({scheme} in {where}: no signature matches the given secret(s))"


def describe_event(body: object) -> str:
    """The event type of a webhookd / remoteit / kobiton body, ``-`` when unknown."""
    if not isinstance(body, dict):
        return "-"
    for key in ("type", "eventActivity"):
        if isinstance(body.get(key), str):
            return str(body[key])
    if isinstance(body.get("Type"), str):  # remoteit
        state = body.get("State")
        return f"{body['Type']} ({state})" if isinstance(state, str) else str(body["Type"])
    return "-"


def format_block(method: str, path: str, headers: Mapping[str, str], body: bytes, signature: str, when: float) -> str:
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        parsed: object = json.loads(body) if body else None
        pretty = json.dumps(parsed, indent=2, ensure_ascii=False) if body else "(empty body)"
    except ValueError:
        parsed = None
        text = body.decode("utf-8", "replace")
        pretty = text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + f"\n… ({len(text)} characters)"
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    lines = [
        f"--- {stamp} {method} {path}",
        f"Webhook-Id:      {lower.get('webhook-id', '-')}",
        f"Webhook-Attempt: {lower.get('webhook-attempt', '-')}",
        f"event:           {describe_event(parsed)}",
        f"signature:       {signature}",
        pretty,
        "",
    ]
    return "\n".join(lines)


def _make_app(secrets: Sequence[str], out: TextIO) -> web.Application:
    async def receive(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.json_response({"error": "POST webhooks here"}, status=405, headers={"Allow": "POST"})
        body = await request.read()
        headers = dict(request.headers)
        when = time.time()
        block = format_block(
            request.method,
            request.path_qs,
            headers,
            body,
            check_signature(headers, body, secrets, when),
            when,
        )
        out.write(block + "\n")
        out.flush()
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", receive)
    return app


def _url(host: str, port: int) -> str:
    return f"http://{HostPort(host=host, port=port)}/"


async def serve(host: str, port: int, secrets: Sequence[str], out: TextIO = sys.stdout) -> int:
    runner = web.AppRunner(_make_app(secrets, out), handle_signals=False, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as e:
            print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
            return 1
        bound = port
        for addr in runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                bound = int(addr[1])
                break
        checked = f"checking signatures with {len(secrets)} secret(s)" if secrets else "not checking signatures"
        out.write(f"webhookd sink listening on {_url(host, bound)} ({checked}; Ctrl-C stops)\n")
        out.flush()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        await stop.wait()
        return 0
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run_sink(host: str, port: int, secrets: Sequence[str]) -> int:
    """Run the sink until SIGINT/SIGTERM; the exit code."""
    try:
        return asyncio.run(serve(host, port, list(secrets)))
    except KeyboardInterrupt:
        return 130

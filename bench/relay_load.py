"""A gateway's relay as load: signed `POST /v1/relay` requests to one or more hub processes, in its own process.

    python -m bench.relay_load --url http://127.0.0.1:8470,http://127.0.0.1:8471 --gateway bench-gw \
        --secret S --devices 10000 --prefix r0- --connections 64 --seconds 10
    python -m bench.relay_load ... --count 20000      # exactly 20,000 events, then stop (a backlog)

Each request is one event in the `webhookd` format with a fresh id, as a gateway's `upstream` endpoint sends it
(webhookd/upstream.py): `Content-Type: application/json`, `Webhookd-Gateway: <gateway>`, `Webhookd-Signature:
t=<unix>,v1=<hex hmac-sha256 of "<t>." + body>`, `Webhook-Id: <event id>`. The connections are split evenly over
the URLs (a load balancer in front of the hub); with `--gateways N` connection c relays as gateway `<gateway>-<c % N>`
(secret `<secret>-<c % N>`), so that N gateways relay at once; devices rotate over `--devices` ids, each one alternating
offline/online. Only a 2xx counts (the hub answers it after the commit); anything else is an error. Prints one
`RESULT {json}` line: rps, requests, errors, p50_ms, p99_ms, per_url (2xx per URL), statuses (non-2xx).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import os
import time
from datetime import UTC, datetime

import aiohttp

from bench.common import percentile, run_main


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Relays:
    """The events: unique ids (a random run prefix + a counter), devices in rotation, alternating states."""

    def __init__(self, prefix: str, devices: int, gateway: str, secret: str) -> None:
        self.run = os.urandom(6).hex()
        self.prefix = prefix
        self.devices = devices
        self.gateway = gateway
        self.key = secret.encode()
        self.seq = itertools.count()

    def next(self, gateway: int | None = None) -> tuple[bytes, dict[str, str]]:
        """The next event, from gateway number `gateway` (`<gateway>-<n>`, secret `<secret>-<n>`) when given."""
        name, key = self.gateway, self.key
        if gateway is not None:
            name, key = f"{name}-{gateway}", b"%s-%d" % (key, gateway)
        i = next(self.seq)
        dev = f"{self.prefix}{i % self.devices:06d}"
        offline = (i // self.devices) % 2 == 0
        state, previous = ("offline", "online") if offline else ("online", "offline")
        now = _rfc3339(time.time())
        event_id = f"evt_{self.run}{i:010d}"
        body = json.dumps(
            {
                "id": event_id,
                "type": f"device.{state}",
                "time": now,
                "reason": "timeout" if offline else "heartbeat",
                "device": {
                    "id": dev,
                    "name": None,
                    "state": state,
                    "previous_state": previous,
                    "address": "10.0.0.7",
                    "owner": None,
                    "last_seen": now,
                },
                "offline_for": None if offline else 60.0,
                "endpoint": "upstream",
            },
            separators=(",", ":"),
        ).encode()
        t = int(time.time())
        mac = hmac.new(key, b"%d." % t + body, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "Webhookd-Gateway": name,
            "Webhookd-Signature": f"t={t},v1={mac}",
            "Webhook-Id": event_id,
        }
        return body, headers


async def run(args: argparse.Namespace) -> dict[str, object]:
    urls = [u.rstrip("/") + "/v1/relay" for u in args.url.split(",") if u]
    relays = Relays(args.prefix, args.devices, args.gateway, args.secret)
    latencies: list[float] = []
    per_url = dict.fromkeys(urls, 0)
    statuses: dict[str, int] = {}
    errors = 0
    sent = 0
    stop_at = time.monotonic() + args.seconds

    def more() -> bool:
        return bool(args.count is None or sent < args.count) and time.monotonic() < stop_at

    async def worker(s: aiohttp.ClientSession, url: str, gateway: int | None) -> None:
        nonlocal errors, sent
        while more():
            sent += 1
            body, headers = relays.next(gateway)
            t = time.perf_counter()
            for attempt in range(50 if args.count is not None else 1):  # a backlog must be complete: retry
                try:
                    async with s.post(url, data=body, headers=headers) as r:
                        await r.read()
                        ok = 200 <= r.status < 300
                        if not ok:
                            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
                except (aiohttp.ClientError, TimeoutError) as e:
                    ok = False
                    statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                if ok:
                    latencies.append((time.perf_counter() - t) * 1000)
                    per_url[url] += 1
                    break
                errors += 1
                if args.count is not None:
                    await asyncio.sleep(min(0.05 * (attempt + 1), 1.0))

    started = time.monotonic()
    cpu0 = time.process_time()
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.connections), timeout=aiohttp.ClientTimeout(total=30)
        )
        for _ in urls
    ]
    try:
        await asyncio.gather(
            *(
                worker(sessions[c % len(urls)], urls[c % len(urls)], None if args.gateways == 1 else c % args.gateways)
                for c in range(args.connections)
            )
        )
    finally:
        for s in sessions:
            await s.close()
    elapsed = time.monotonic() - started
    return {
        "rps": len(latencies) / elapsed,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "per_url": per_url,
        "statuses": statuses,
        "seconds": elapsed,
        "cpu": (time.process_time() - cpu0) / elapsed,  # this load generator's share of its core
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="comma-separated hub base URLs")
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--gateways", type=int, default=1, help="N > 1: connection c relays as <gateway>-<c %% N>")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--prefix", default="r-")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0, help="at most this long (with --count too)")
    ap.add_argument("--count", type=int, default=None, help="send exactly this many events (each retried to a 2xx)")
    args = ap.parse_args()
    print("RESULT " + json.dumps(run_main(lambda: run(args))), flush=True)


if __name__ == "__main__":
    main()

"""An aiohttp heartbeat load generator, run in its own process (on the load core).

    python -m bench.loadgen closed --url URL --devices 10000 --mode liveness --connections 64 --seconds 10
    python -m bench.loadgen rate   --url URL --devices 1000 --prefix probe- --rate 200 --seconds 60 [--new-conn]
    python -m bench.loadgen rate   --udp 127.0.0.1:8471 --devices 10000 --rate 167 --seconds 60

`closed`: N keep-alive connections sending back to back (the fallback when wrk is not installed).
`rate`: an open loop at a fixed rate (each request is sent on schedule whether or not earlier ones have
answered), optionally one new connection per heartbeat like a device running curl; stops after `--seconds`
or on SIGTERM/SIGINT; with `--udp HOST:PORT` each heartbeat is one datagram with the plain-text device id
(no answer, so no latency). `--samples FILE` writes every request as `sent_monotonic latency_ms status` lines.
Prints one `RESULT {json}` line: rps, requests, errors, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path

import aiohttp

from bench.common import percentile, run_main


def body_for(prefix: str, i: int, devices: int, mode: str) -> bytes:
    dev = f"{prefix}{i % devices:06d}"
    if mode == "transition":
        state = "unplugged" if (i // devices) % 2 == 0 else "online"
        return b'{"device":"%s","state":"%s"}' % (dev.encode(), state.encode())
    return b'{"device":"%s"}' % dev.encode()


HEADERS = {"Content-Type": "application/json"}


def summary(latencies_ms: list[float], elapsed: float, errors: int) -> dict[str, object]:
    """The RESULT line's fields."""
    return {
        "rps": len(latencies_ms) / elapsed,
        "requests": len(latencies_ms),
        "errors": errors,
        "p50_ms": percentile(latencies_ms, 50),
        "p99_ms": percentile(latencies_ms, 99),
    }


async def closed(args: argparse.Namespace) -> dict[str, object]:
    url = args.url.rstrip("/") + "/v1/heartbeat"
    counter = 0
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + args.seconds

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal counter, errors
        while time.monotonic() < stop_at:
            i = counter
            counter += 1
            t = time.perf_counter()
            try:
                async with s.post(url, data=body_for(args.prefix, i, args.devices, args.mode), headers=HEADERS) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            latencies.append((time.perf_counter() - t) * 1000)

    connector = aiohttp.TCPConnector(limit=args.connections)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as s:
        await asyncio.gather(*(worker(s) for _ in range(args.connections)))
    return summary(latencies, time.monotonic() - started, errors)


async def rate_udp(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, object]:
    host, _, port = args.udp.rpartition(":")
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(host, int(port)))
    started = time.monotonic()
    i = 0
    while not stop.is_set():
        due = started + i / args.rate
        if due - started >= args.seconds:
            break
        now = time.monotonic()
        if due > now:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(due - now):
                    await stop.wait()
            continue
        transport.sendto(f"{args.prefix}{i % args.devices:06d}".encode())
        i += 1
    transport.close()
    elapsed = time.monotonic() - started
    return {"rps": i / elapsed, "requests": i, "errors": 0, "p50_ms": None, "p99_ms": None}


async def rate(args: argparse.Namespace) -> dict[str, object]:
    url = args.url.rstrip("/") + "/v1/heartbeat"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.udp:
        return await rate_udp(args, stop)
    samples: list[tuple[float, float, int]] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        nonlocal errors
        t = time.monotonic()
        status = 0
        try:
            async with s.post(url, data=body_for(args.prefix, i, args.devices, "liveness"), headers=HEADERS) as r:
                await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError):
            pass
        if status != 200:
            errors += 1
        samples.append((t, (time.monotonic() - t) * 1000, status))

    connector = aiohttp.TCPConnector(limit=0 if args.new_conn else args.connections, force_close=args.new_conn)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as s:
        i = 0
        while not stop.is_set():
            due = started + i / args.rate
            now = time.monotonic()
            if due - started >= args.seconds:
                break
            if due > now:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due - now):
                        await stop.wait()
                continue
            task = asyncio.create_task(one(s, i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks, timeout=15)
    elapsed = time.monotonic() - started
    if args.samples:
        with Path(args.samples).open("w") as f:
            for t, ms, st in samples:
                f.write(f"{t:.6f} {ms:.3f} {st}\n")
    return summary([ms for _, ms, _ in samples], elapsed, errors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=["closed", "rate"])
    p.add_argument("--url", default="")
    p.add_argument("--udp", help="HOST:PORT: send plain-text UDP heartbeats (rate mode)")
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--prefix", default="bench-")
    p.add_argument("--mode", choices=["liveness", "transition"], default="liveness")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--new-conn", action="store_true")
    p.add_argument("--samples")
    args = p.parse_args()
    fn = closed if args.kind == "closed" else rate
    result = run_main(lambda: fn(args))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

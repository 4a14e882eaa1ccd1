"""webhookd/mqtt/wire.py against a real Mosquitto: paho's socket read in large chunks and PUBACKs merged must
still hand over every message, whole and in order, and acknowledge each one (a message left unacknowledged
is sent again by the broker when the persistent session resumes)."""

from __future__ import annotations

import asyncio
import collections
import threading

import aiomqtt
import pytest

from tests.conftest import BrokerFactory
from tests.mqtt_broker import Broker
from webhookd.mqtt.wire import PUBACK, Client, merge_acks

N = 3_000


def _client(b: Broker, client_id: str) -> Client:
    c = Client(b.host, b.port, identifier=client_id, clean_session=False, tls_context=b.ssl_context(), timeout=10.0)
    c._loop_thread = threading.get_ident()
    return c


def _payload(k: int) -> bytes:
    # mostly small (many packets per read), every 500th larger than one read of the buffer (split across reads)
    return f"{k}:".encode() + (b"x" * 100_000 if k % 500 == 7 else b"online")


async def _publish_all(b: Broker) -> None:
    """In bursts of 500 over plain TCP (many packets per read); one at a time over TLS, where aiomqtt's
    publisher stalls with hundreds in flight (whatever the subscriber: not what this file tests)."""
    burst = 1 if b.tls else 500
    async with aiomqtt.Client(
        b.host, b.port, tls_context=b.ssl_context(), max_inflight_messages=1_000, timeout=30.0
    ) as pub:
        for start in range(0, N, burst):
            await asyncio.gather(
                *(pub.publish(f"dev-{k % 100}/status", _payload(k), qos=1) for k in range(start, start + burst))
            )


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_burst_of_qos1_messages_arrives_whole_in_order_and_every_one_acknowledged(
    broker: BrokerFactory, tls: bool
) -> None:
    b = await broker(tls=tls)
    got: list[bytes] = []
    async with _client(b, "wire-test") as c:
        await c.subscribe("+/status", qos=1)
        publishing = asyncio.create_task(_publish_all(b))
        async with asyncio.timeout(60):
            async for m in c.messages:
                assert isinstance(m.payload, bytes)
                got.append(m.payload)
                if len(got) == N:
                    break
        await publishing
    assert got == [_payload(k) for k in range(N)]
    # the same session again: anything we did not acknowledge would be sent again now
    again: list[bytes] = []
    async with _client(b, "wire-test") as c:
        assert c.session_present
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                async for m in c.messages:
                    again.append(bytes(m.payload) if isinstance(m.payload, bytes) else b"")
    assert again == []


def _packet(command: int, data: bytes, pos: int = 0) -> dict[str, object]:
    return {"command": command, "mid": 1, "qos": 1, "pos": pos, "to_process": len(data) - pos, "packet": data}


def test_merge_acks_joins_runs_of_pubacks_and_keeps_the_rest_in_order() -> None:
    publish = _packet(0x32, b"\x32publish")
    partly = _packet(PUBACK, b"\x40\x02\x00\x09", pos=2)  # half written already: left as it is
    q = collections.deque(
        [partly, *(_packet(PUBACK, bytes([0x40, 2, 0, k])) for k in range(1, 4)), publish, _packet(PUBACK, b"z")]
    )
    merge_acks(q)
    assert [(p["command"], p["pos"], p["packet"]) for p in q] == [
        (PUBACK, 2, b"\x40\x02\x00\x09"),
        (PUBACK, 0, b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x02\x00\x03"),
        (0x32, 0, b"\x32publish"),
        (PUBACK, 0, b"z"),
    ]
    assert q[1]["to_process"] == 12

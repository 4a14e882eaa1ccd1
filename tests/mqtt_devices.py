"""Real MQTT devices for the tests: N clients (1 to a few thousand) in ONE asyncio process, each with its own client
id, keep-alive and last will, publishing what the real firmware publishes.

    python -m tests.mqtt_devices --url mqtt://127.0.0.1:PORT --preset tasmota --count 50 --keepalive 2 \
        [--prefix dev-] [--ids a,b,c] [--base tele] [--no-reconnect dev-1,dev-2] [--stay-down K] \
        [--username U --password P] [--cafile CA.pem] [--retry 1.0]

Presets (ID = the device id; every availability message retained, QoS 1, as the real systems do):
    tasmota      will `<base|tele>/ID/LWT` "Offline", online "Online"
    esphome      will `ID/status` "offline", online "online"
    shelly       will `<base|shellies>/ID/online` "false", online "true"          (gen1)
    shelly-gen2  will `ID/online` "false", online "true"
    zigbee2mqtt  ONE bridge client (client id and device id `<base|zigbee2mqtt>`): will `<base>/bridge/state`
                 {"state":"offline"}, online {"state":"online"}, then `<base>/ID/availability` {"state":"online"}
                 for every device (--z2m-plain: the plain words online/offline, as Zigbee2MQTT < 1.30 did)
    generic      --topic 'lab/{id}/presence' --online online --offline offline [--no-retain] [--qos 0|1]

Stdout, one line each, flushed:
    ready N        every device connected and its online publish acknowledged (PUBACK); printed once
    lost ID        a client's connection dropped (after `ready`)
    connected ID   a client is back: connected again and its online publish acknowledged
    error ID TEXT  a connection attempt failed (refused login, unreachable broker); it retries every --retry s
    stopped N      after SIGTERM, once every connected device published its offline payload and disconnected

Signals: SIGSTOP of the process = power loss of every device in it (no FIN: the broker publishes the wills after
1.5 x keep-alive, as it checks them); SIGCONT = power back (the clients find their sockets closed and reconnect).
SIGTERM = a clean shutdown: each connected device publishes its offline payload (what the firmware does on a
restart), then DISCONNECTs (so the broker does not publish its will), and the process exits 0. SIGKILL = the
sockets close with a FIN: the broker publishes every will at once.
Reconnect: after a lost connection every device retries every --retry seconds (1 s) and republishes its online
payload, except the ids in --no-reconnect and the last --stay-down K ids, which stay down.
Stdin (optional), one command a line: `drop ID` (its socket is shut down without DISCONNECT: the broker publishes
its will at once; it reconnects unless it stays down), `stop ID` (clean: offline publish, DISCONNECT, no
reconnect), `start ID` (a stopped device connects again).

Tests drive it with the `Devices` class below (or the `devices` fixture of tests/conftest.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from tests.mqtt_broker import Broker

PRESETS = ("tasmota", "esphome", "shelly", "shelly-gen2", "zigbee2mqtt", "generic")
DEFAULT_BASE = {"tasmota": "tele", "shelly": "shellies", "zigbee2mqtt": "zigbee2mqtt"}


@dataclass
class Style:
    """Where and what one preset publishes: `topic` has `{id}` and `{base}` fields."""

    topic: str
    online: str
    offline: str
    retain: bool = True
    qos: int = 1


def style_for(preset: str, *, topic: str | None = None, online: str = "online", offline: str = "offline",
              retain: bool = True, qos: int = 1, z2m_plain: bool = False) -> Style:  # fmt: skip
    if preset == "tasmota":
        return Style("{base}/{id}/LWT", "Online", "Offline")
    if preset == "esphome":
        return Style("{id}/status", "online", "offline")
    if preset == "shelly":
        return Style("{base}/{id}/online", "true", "false")
    if preset == "shelly-gen2":
        return Style("{id}/online", "true", "false")
    if preset == "zigbee2mqtt":
        if z2m_plain:
            return Style("{base}/{id}/availability", "online", "offline")
        return Style("{base}/{id}/availability", json.dumps({"state": "online"}), json.dumps({"state": "offline"}))
    if preset == "generic":
        if not topic or "{id}" not in topic:
            raise SystemExit("generic: --topic with an {id} field is required (e.g. 'lab/{id}/presence')")
        return Style(topic, online, offline, retain, qos)
    raise SystemExit(f"unknown preset {preset!r} (one of {', '.join(PRESETS)})")


def availability_topic(preset: str, device_id: str, base: str | None = None, topic: str | None = None) -> str:
    """The topic a device of `preset` publishes its availability on (zigbee2mqtt: a device's, not the bridge's)."""
    style = style_for(preset, topic=topic)
    return style.topic.format(id=device_id, base=base or DEFAULT_BASE.get(preset, ""))


# --- the device process ----------------------------------------------------------------------------------------------


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class Device:
    """One MQTT client: a real device, or the zigbee2mqtt bridge (then `publishes` holds every device's topic)."""

    id: str
    client_id: str
    will: tuple[str, str]  # topic, payload
    publishes: list[tuple[str, str]]  # what it publishes once connected: (topic, online payload)
    offline: list[tuple[str, str]]  # what it publishes on a clean shutdown
    stays_down: bool = False
    client: Any = None
    connected: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)  # `stop ID`: no reconnect until `start ID`
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        import aiomqtt

        self.aiomqtt = aiomqtt
        self.args = args
        url = urlsplit(args.url)
        if url.scheme not in ("mqtt", "mqtts"):
            raise SystemExit(f"--url must be mqtt:// or mqtts://, not {args.url!r}")
        self.host = url.hostname or "127.0.0.1"
        self.tls = url.scheme == "mqtts"
        self.port = url.port or (8883 if self.tls else 1883)
        self.style = style_for(
            args.preset,
            topic=args.topic,
            online=args.online,
            offline=args.offline,
            retain=not args.no_retain,
            qos=args.qos,
            z2m_plain=args.z2m_plain,
        )
        self.base = args.base or DEFAULT_BASE.get(args.preset, "")
        if args.ids:
            ids = [i for i in args.ids.split(",") if i]
        else:
            ids = [f"{args.prefix}{n}" for n in range(1, args.count + 1)]
        down = {i for i in (args.no_reconnect or "").split(",") if i}
        if args.stay_down:
            down |= set(ids[-args.stay_down :])
        self.ids = ids
        self.stopping = asyncio.Event()
        self.connects = asyncio.Semaphore(args.parallel)
        self.ready_left = 0
        self.ready_said = False
        self.devices: dict[str, Device] = {}
        qos, retain = self.style.qos, self.style.retain
        self.qos, self.retain = qos, retain
        if args.preset == "zigbee2mqtt":
            on = json.dumps({"state": "online"}) if not args.z2m_plain else "online"
            off = json.dumps({"state": "offline"}) if not args.z2m_plain else "offline"
            bridge = f"{self.base}/bridge/state"
            topics = [self.topic(i) for i in ids]
            self.z2m_down = {self.topic(i) for i in ids if i in down}
            self.devices[self.base] = Device(
                id=self.base,
                client_id=args.client_id_prefix + self.base,
                will=(bridge, off),
                publishes=[(bridge, on)] + [(t, self.style.online) for t in topics],
                offline=[(bridge, off)],
                stays_down=self.base in down,
            )
        else:
            self.z2m_down = set()
            for i in ids:
                t = self.topic(i)
                self.devices[i] = Device(
                    id=i,
                    client_id=args.client_id_prefix + i,
                    will=(t, self.style.offline),
                    publishes=[(t, self.style.online)],
                    offline=[(t, self.style.offline)],
                    stays_down=i in down,
                )

    def topic(self, device_id: str) -> str:
        return self.style.topic.format(id=device_id, base=self.base)

    def client(self, dev: Device) -> Any:
        aiomqtt = self.aiomqtt
        tls_params = None
        if self.tls:
            tls_params = aiomqtt.TLSParameters(ca_certs=self.args.cafile)
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.args.username,
            password=self.args.password,
            identifier=dev.client_id,
            keepalive=self.args.keepalive,
            clean_session=True,
            will=aiomqtt.Will(dev.will[0], dev.will[1], qos=self.qos, retain=self.retain),
            tls_params=tls_params,
            timeout=10,
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int, frame: Any) -> None:
            # A plain handler, not loop.add_signal_handler: that one carries the signal through the loop's wakeup
            # fd, and a busy loop (1,000 clients reconnecting) can find it full and lose the SIGTERM.
            loop.call_soon_threadsafe(self.stopping.set)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.ready_left = len(self.devices)
        stdin_task = asyncio.ensure_future(self.read_stdin())
        await asyncio.gather(*(self.run_device(d, first=True) for d in self.devices.values()))
        stdin_task.cancel()
        say(f"stopped {len(self.ids)}")
        return 0

    def online_payloads(self, dev: Device, first: bool) -> list[tuple[str, str]]:
        if first or not self.z2m_down:
            return dev.publishes
        return [(t, p) for t, p in dev.publishes if t not in self.z2m_down]

    async def run_device(self, dev: Device, first: bool) -> None:
        MqttError = self.aiomqtt.MqttError
        was_up = False
        while not self.stopping.is_set():
            if dev.stopped.is_set():
                await self.sleep_until(dev.wake, None)
                continue
            lost: BaseException | None = None
            try:
                async with self.connects:
                    client = self.client(dev)
                    await client.__aenter__()
                try:
                    for topic, payload in self.online_payloads(dev, first):
                        await client.publish(topic, payload, qos=self.qos, retain=self.retain)
                    dev.client, dev.connected, was_up = client, True, True
                    if first:
                        first = False
                        self.ready_left -= 1
                        if self.ready_left == 0 and not self.ready_said:
                            self.ready_said = True
                            say(f"ready {len(self.ids)}")
                    else:
                        say(f"connected {dev.id}")
                    why = await self.wait_lost(client, dev)
                    if why in ("stopping", "stop"):
                        with contextlib.suppress(MqttError, asyncio.TimeoutError):
                            for topic, payload in dev.offline:
                                await asyncio.wait_for(
                                    client.publish(topic, payload, qos=self.qos, retain=self.retain), 5
                                )
                        if why == "stop":
                            dev.stopped.set()
                            dev.wake.clear()
                finally:
                    dev.connected = False
                    dev.client = None
                    with contextlib.suppress(MqttError, asyncio.TimeoutError):
                        await asyncio.wait_for(client.__aexit__(None, None, None), 5)
                if dev.stopped.is_set() or self.stopping.is_set():
                    if was_up:
                        say(f"lost {dev.id}")
                        was_up = False
                    continue
            except MqttError as e:
                lost = e
            if was_up:
                say(f"lost {dev.id}")
                was_up = False
                if dev.stays_down:
                    return
            elif lost is not None:
                say(f"error {dev.id} {str(lost).replace(chr(10), ' ')[:200]}")
            if dev.stays_down and not first:
                return
            await self.sleep_until(self.stopping, self.args.retry)

    async def wait_lost(self, client: Any, dev: Device) -> str:
        """Until the connection drops (raises MqttError), SIGTERM ("stopping") or a `stop ID` ("stop")."""

        async def messages() -> None:
            async for _ in client.messages:
                pass

        tasks = {
            asyncio.ensure_future(messages()): "lost",
            asyncio.ensure_future(self.stopping.wait()): "stopping",
            asyncio.ensure_future(dev.stopped.wait()): "stop",
        }
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for t in done:
            if tasks[t] == "lost":
                t.result()  # raises the MqttError
                raise self.aiomqtt.MqttError("the messages iterator ended")
        return tasks[next(iter(done))]

    @staticmethod
    async def sleep_until(event: asyncio.Event, timeout: float | None) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def read_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        except (OSError, ValueError):
            return
        while line := await reader.readline():
            cmd, _, arg = line.decode().strip().partition(" ")
            dev = self.devices.get(arg)
            if dev is None:
                say(f"error {arg} no such device")
                continue
            if cmd == "drop" and dev.client is not None:
                sock = dev.client._client.socket()
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            elif cmd == "stop":
                dev.stopped.set()
            elif cmd == "start":
                dev.stopped.clear()
                dev.wake.set()
            else:
                say(f"error {arg} unknown command {cmd!r}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.mqtt_devices", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--preset", default="tasmota", choices=PRESETS)
    p.add_argument("--count", type=int, default=1, help="devices PREFIX1..PREFIXN (unless --ids)")
    p.add_argument("--prefix", default="dev-")
    p.add_argument("--ids", help="comma-separated device ids")
    p.add_argument("--base", help="the preset's root topic when not its default")
    p.add_argument("--topic", help="generic: topic template with {id}")
    p.add_argument("--online", default="online", help="generic: online payload")
    p.add_argument("--offline", default="offline", help="generic: offline (will) payload")
    p.add_argument("--no-retain", action="store_true", help="generic: publish not retained")
    p.add_argument("--qos", type=int, default=1, choices=(0, 1), help="generic: QoS of will and publishes")
    p.add_argument("--z2m-plain", action="store_true", help="zigbee2mqtt: plain online/offline payloads")
    p.add_argument("--keepalive", type=int, default=2, help="seconds (default 2)")
    p.add_argument("--retry", type=float, default=1.0, help="seconds between reconnect attempts (default 1)")
    p.add_argument("--no-reconnect", default="", help="comma-separated ids that stay down once they lose it")
    p.add_argument("--stay-down", type=int, default=0, help="the last K ids stay down once they lose it")
    p.add_argument("--client-id-prefix", default="", help="prepended to each client id")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--cafile", help="CA for mqtts://")
    p.add_argument("--parallel", type=int, default=50, help="connection attempts at once (default 50)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    async def go() -> int:
        return await Fleet(args).run()

    return asyncio.run(go())


# --- the test side ---------------------------------------------------------------------------------------------------


class Devices:
    """Drive `python -m tests.mqtt_devices` from a test.

        devs = Devices(broker, 50, preset="tasmota", keepalive=2, stay_down=3)
        await devs.start()                     # until `ready 50`
        devs.freeze()                          # SIGSTOP: power loss (devs.frozen_at: its time.monotonic())
        await devs.wait_connected(ids, 15)     # `connected ID` lines after a broker restart
        await devs.stop()                      # SIGTERM: offline publishes, DISCONNECT; the exit code

    `ids` are the device ids (`prefix`1..N, or the given list); `topic(id)` is a device's availability topic;
    `connected`/`lost` hold the ids whose last line was that; `events` every (time.monotonic(), line)."""

    def __init__(
        self,
        broker: Broker | str,
        devices: int | Sequence[str] = 1,
        *,
        preset: str = "tasmota",
        keepalive: int = 2,
        prefix: str = "dev-",
        base: str | None = None,
        topic: str | None = None,
        online: str | None = None,
        offline: str | None = None,
        retain: bool = True,
        qos: int = 1,
        z2m_plain: bool = False,
        no_reconnect: Sequence[str] = (),
        stay_down: int = 0,
        retry: float = 1.0,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        client_id_prefix: str = "",
    ) -> None:
        if isinstance(broker, str):
            self.url = broker
        else:
            self.url = broker.url
            creds = broker.credentials()
            if creds is not None and username is None:
                username, password = creds
            if broker.tls and ca_file is None:
                ca_file = broker.ca_file
        self.ids = [f"{prefix}{n}" for n in range(1, devices + 1)] if isinstance(devices, int) else list(devices)
        self.preset = preset
        self.base = base or DEFAULT_BASE.get(preset, "")
        self.topic_template = topic
        args = ["--url", self.url, "--preset", preset, "--keepalive", str(keepalive), "--retry", str(retry)]
        args += ["--ids", ",".join(self.ids)]
        for flag, value in (
            ("--base", base),
            ("--topic", topic),
            ("--online", online),
            ("--offline", offline),
            ("--username", username),
            ("--password", password),
            ("--cafile", None if ca_file is None else os.fspath(ca_file)),
            ("--client-id-prefix", client_id_prefix or None),
        ):
            if value is not None:
                args += [flag, value]
        if not retain:
            args.append("--no-retain")
        if qos != 1:
            args += ["--qos", str(qos)]
        if z2m_plain:
            args.append("--z2m-plain")
        if no_reconnect:
            args += ["--no-reconnect", ",".join(no_reconnect)]
        if stay_down:
            args += ["--stay-down", str(stay_down)]
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[tuple[float, str]] = []
        self.connected: set[str] = set()
        self.lost: set[str] = set()
        self.errors: list[str] = []
        self.ready_at: float | None = None
        self.frozen_at: float | None = None
        self.stderr = b""
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._stderr_reader: asyncio.Task[None] | None = None

    @property
    def clients(self) -> list[str]:
        """The names in connected/lost lines: the device ids, or the zigbee2mqtt bridge's base."""
        return [self.base] if self.preset == "zigbee2mqtt" else list(self.ids)

    def topic(self, device_id: str) -> str:
        return availability_topic(self.preset, device_id, self.base, self.topic_template)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 30.0) -> Devices:
        """Start the process; return once it printed `ready N` (every online publish acknowledged)."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.mqtt_devices",
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=root,
            env=env,
        )
        self._reader = asyncio.ensure_future(self._read())
        self._stderr_reader = asyncio.ensure_future(self._read_stderr())
        try:
            await self._wait(lambda: self.ready_at is not None, timeout, "ready")
        except BaseException:
            await self.kill()
            raise
        self.connected = set(self.clients)
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            now = time.monotonic()
            self.events.append((now, text))
            kind, _, rest = text.partition(" ")
            if kind == "ready":
                self.ready_at = now
            elif kind == "connected":
                self.connected.add(rest)
                self.lost.discard(rest)
            elif kind == "lost":
                self.lost.add(rest)
                self.connected.discard(rest)
            elif kind == "error":
                self.errors.append(rest)
            self._changed.set()
        self._changed.set()

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr = (self.stderr + chunk)[-20000:]

    async def _wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc is not None and self.proc.returncode is not None and self._reader and self._reader.done():
                raise AssertionError(f"the devices process exited {self.proc.returncode} before {what}: {self.tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s: {self.tail()}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    def tail(self) -> str:
        lines = [line for _, line in self.events[-10:]]
        return f"stdout ends {lines}, stderr ends {self.stderr[-2000:].decode(errors='replace')!r}"

    def said(self, kind: str, since: float | None = None) -> dict[str, float]:
        """{name: time.monotonic() of its first `KIND name` line at or after `since`} (`connected`, `lost`)."""
        seen: dict[str, float] = {}
        for at, line in self.events:
            k, _, name = line.partition(" ")
            if k == kind and (since is None or at >= since):
                seen.setdefault(name, at)
        return seen

    async def wait_connected(
        self, ids: Sequence[str] | None = None, timeout: float = 15.0, since: float | None = None
    ) -> None:
        """Until each of `ids` (default: all clients) is connected: its last line `connected ID` (or, before any
        loss, `ready`). since=T (a time.monotonic() before e.g. a broker restart): until each printed `connected ID`
        at or after T (a line is timestamped when read, so after it was printed)."""
        await self._wait_kind("connected", self.connected, ids, timeout, since)

    async def wait_lost(
        self, ids: Sequence[str] | None = None, timeout: float = 15.0, since: float | None = None
    ) -> None:
        """Until each of `ids` (default: all clients) printed `lost ID` (at or after `since`, if given)."""
        await self._wait_kind("lost", self.lost, ids, timeout, since)

    async def _wait_kind(
        self, kind: str, now: set[str], ids: Sequence[str] | None, timeout: float, since: float | None
    ) -> None:
        want = set(self.clients if ids is None else ids)

        def missing() -> set[str]:
            return want - (now if since is None else set(self.said(kind, since)))

        await self._wait(lambda: not missing(), timeout, f"{kind} for {sorted(missing())[:5]} ({len(missing())})")

    def _signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def freeze(self) -> float:
        """SIGSTOP: power loss of every device (no FIN). Returns (and keeps in frozen_at) its time.monotonic()."""
        self._signal(signal.SIGSTOP)
        self.frozen_at = time.monotonic()
        return self.frozen_at

    def thaw(self) -> None:
        """SIGCONT: power back; the clients reconnect once they notice the broker closed their sockets."""
        self._signal(signal.SIGCONT)
        self.frozen_at = None

    async def send(self, command: str) -> None:
        """A stdin command: `drop ID`, `stop ID`, `start ID`."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (thawed first if frozen): every connected device publishes offline and DISCONNECTs. The exit code
        (SIGKILL after `timeout`)."""
        if self.proc is None:
            return None
        if self.running:
            self._signal(signal.SIGTERM)
            if self.frozen_at is not None:
                self.thaw()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await self.kill()
        await self._finish()
        return self.proc.returncode

    async def kill(self) -> None:
        """SIGKILL: the sockets close with a FIN, so the broker publishes every will at once."""
        if self.proc is None:
            return
        if self.running:
            self._signal(signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError, ProcessLookupError):
            await asyncio.wait_for(self.proc.wait(), 10)
        await self._finish()

    async def _finish(self) -> None:
        for task in (self._reader, self._stderr_reader):
            if task is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, 2)
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()


if __name__ == "__main__":
    sys.exit(main())

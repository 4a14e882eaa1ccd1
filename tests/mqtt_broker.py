"""A throwaway Mosquitto broker for the MQTT tests: `mosquitto -c FILE` on a free 127.0.0.1 port, its config, data,
password/ACL files, TLS certificates and log in its own directory, stopped by PID.

    b = Broker(tmp_path / "broker", persistence=True, passwords={"dev": "pw"}, acl="...", tls=True)
    await b.start()             # returns once the port answers an MQTT CONNECT with a CONNACK
    await b.pub("tele/plug-1/LWT", "Online", retain=True)
    await b.restart()           # SIGTERM, then the same port and the same persistence directory
    b.freeze(); b.thaw()        # SIGSTOP / SIGCONT
    await b.stop()              # SIGTERM (SIGKILL after `timeout`)

Mosquitto 2.0 refuses to start as root unless told `user root` (it would drop to user mosquitto, which cannot
write the test's tmp dir): that line is written when os.geteuid() == 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import free_port

HOST = "127.0.0.1"


def mosquitto_binary() -> str | None:
    """The mosquitto executable (Debian installs it in /usr/sbin, which a non-root PATH may lack)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def missing_tools() -> list[str]:
    """Which of the broker's programs are absent (the fixtures skip then; `make mosquitto-tools` installs them)."""
    missing = [] if mosquitto_binary() else ["mosquitto"]
    missing += [tool for tool in ("mosquitto_pub", "mosquitto_passwd") if shutil.which(tool) is None]
    return missing


class BrokerError(RuntimeError):
    pass


class Broker:
    """One mosquitto process (see the module doc). Options:

    port: the listener's port (default: a free one, kept across restart()).
    persistence: False (default) -> `persistence false`; True -> `persistence true`, `persistence_location` in the
        broker's directory and `autosave_interval` (Debian's mosquitto.conf: persistence on, the default 1800 s
        autosave; the database is also written at a clean stop), so that persistent sessions, their queued QoS 1
        messages and retained messages survive restart() (and kill(), as of the last save).
    passwords: {"user": "password"} -> a password_file made with mosquitto_passwd, `allow_anonymous false`.
        pub() uses the first user's credentials unless given others.
    acl: the text of an acl_file (`user NAME` / `topic read|write|readwrite FILTER` / `pattern ...`).
    tls: True -> the listener at `port`/`url` speaks TLS (mqtts://), its certificate signed by a throwaway trustme
        CA whose PEM is at `ca_file` (valid for 127.0.0.1 and localhost). plain=True adds a plain listener too,
        at `plain_port`/`plain_url` (default: only the TLS one).
    max_keepalive: the broker's max_keepalive (default: mosquitto's own, 65535).
    extra: more config lines, appended as they are.
    """

    def __init__(
        self,
        tmp: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        autosave_interval: int = 1800,
        passwords: dict[str, str] | None = None,
        acl: str | None = None,
        tls: bool = False,
        plain: bool | None = None,
        max_keepalive: int | None = None,
        extra: str = "",
    ) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.passwords = dict(passwords or {})
        self.acl = acl
        self.tls = tls
        self.plain = (not tls) if plain is None else plain
        if tls and self.plain:
            self.plain_port: int | None = free_port()
        else:
            self.plain_port = self.port if not tls else None
        self.max_keepalive = max_keepalive
        self.extra = extra
        self.config_file = self.tmp / "mosquitto.conf"
        self.log_file = self.tmp / "mosquitto.log"
        self.out_file = self.tmp / "mosquitto.out"
        self.data_dir = self.tmp / "data"
        self.ca_file: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped_on_purpose = True  # False while it runs: an exit then is unexpected (see died())
        self.frozen = False
        self.starts = 0
        self._written = False

    # --- addresses -------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def plain_url(self) -> str | None:
        return None if self.plain_port is None else f"mqtt://{self.host}:{self.plain_port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def credentials(self) -> tuple[str, str] | None:
        """The first user's (username, password), or None for an anonymous broker."""
        return next(iter(self.passwords.items()), None)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting the broker's CA (None without TLS)."""
        if not self.tls:
            return None
        assert self.ca_file is not None, "start() the broker first (it makes the CA)"
        return ssl.create_default_context(cafile=str(self.ca_file))

    # --- config ----------------------------------------------------------------------------------------------------

    def _write_files(self) -> None:
        lines = [f"# throwaway broker for a webhookd test ({self.tmp})"]
        if os.geteuid() == 0:
            lines.append("user root")
        lines += [
            f"log_dest file {self.log_file}",
            "log_type all",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        if self.persistence:
            self.data_dir.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                f"autosave_interval {self.autosave_interval}",
            ]
        else:
            lines.append("persistence false")
        if self.max_keepalive is not None:
            lines.append(f"max_keepalive {self.max_keepalive}")
        if self.passwords:
            pw_file = self.tmp / "passwords"
            pw_file.unlink(missing_ok=True)
            for i, (user, password) in enumerate(self.passwords.items()):
                args = ["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(pw_file), user, password]
                subprocess.run(args, check=True, capture_output=True)
            pw_file.chmod(0o600)
            lines += [f"password_file {pw_file}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl_file = self.tmp / "acl"
            acl_file.write_text(self.acl if self.acl.endswith("\n") else self.acl + "\n")
            lines.append(f"acl_file {acl_file}")
        if self.tls:
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            self.ca_file = self.tmp / "ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            cert_file, key_file = self.tmp / "server.pem", self.tmp / "server.key"
            cert.private_key_pem.write_to_path(str(key_file))
            with open(cert_file, "wb") as f:
                for blob in cert.cert_chain_pems:
                    f.write(blob.bytes())
            key_file.chmod(0o600)
            lines += [
                f"listener {self.port} {self.host}",
                f"certfile {cert_file}",
                f"keyfile {key_file}",
            ]
            if self.plain_port is not None:
                lines.append(f"listener {self.plain_port} {self.host}")
        else:
            lines.append(f"listener {self.port} {self.host}")
        if self.extra:
            lines.append(self.extra)
        self.config_file.write_text("\n".join(lines) + "\n")
        self._written = True

    def log(self) -> str:
        """Mosquitto's log so far (every start appends to it), for debugging a failure."""
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        try:
            out = self.out_file.read_text(errors="replace")
        except FileNotFoundError:
            out = ""
        return text + (f"\n--- stdout/stderr ---\n{out}" if out.strip() else "")

    # --- lifecycle -------------------------------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> Broker:
        """Start mosquitto and return once its (first) listener answers an MQTT CONNECT with a CONNACK."""
        if self.running:
            raise BrokerError(f"broker on port {self.port} is already running (pid {self.pid})")
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto is not installed (make mosquitto-tools)")
        if not self._written:
            self._write_files()
        with open(self.out_file, "ab") as out:
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.config_file)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.starts += 1
        self.frozen = False
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self.proc.returncode} at start:\n{self.log()[-3000:]}")
            if await self.answers_connect():
                break
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"mosquitto did not answer a CONNECT within {timeout} s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.02)
        self.stopped_on_purpose = False
        return self

    async def answers_connect(self, timeout: float = 1.0) -> bool:
        """True when the listener takes an MQTT 3.1.1 CONNECT and replies with a CONNACK (any return code: a
        password broker refuses the anonymous probe with 5, which still proves it is up)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host, self.port, ssl=self.ssl_context(), server_hostname=self.host if self.tls else None
                ),
                timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError):
            return False
        try:
            client_id = f"probe-{os.getpid()}-{time.monotonic_ns()}".encode()
            variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name and level 4, clean session, keep-alive 10
            body = variable + len(client_id).to_bytes(2, "big") + client_id
            writer.write(bytes([0x10, len(body)]) + body)
            await writer.drain()
            connack = await asyncio.wait_for(reader.readexactly(4), timeout)
            if connack[0] != 0x20:
                return False
            writer.write(b"\xe0\x00")  # DISCONNECT
            await writer.drain()
            return True
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), timeout)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 10.0) -> int | None:
        """Wait for the process to exit; its return code, or None if it still runs after `timeout`."""
        if self.proc is None:
            return None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
        return self.proc.returncode

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a frozen broker is thawed first), wait for the exit; SIGKILL after `timeout`. The return code."""
        self.stopped_on_purpose = True
        if not self.running:
            return None if self.proc is None else self.proc.returncode
        self._signal(signal.SIGTERM)
        if self.frozen:
            self.thaw()
        code = await self.wait_exit(timeout)
        if code is None:
            self.kill()
            code = await self.wait_exit(5.0)
        return code

    def kill(self) -> None:
        """SIGKILL: no clean shutdown (with persistence, the database is as of its last autosave)."""
        self.stopped_on_purpose = True
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    async def restart(self, timeout: float = 10.0) -> Broker:
        """stop(), then start() on the same port with the same config and persistence directory."""
        await self.stop()
        return await self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP: the broker hangs (sockets open, nothing answered)."""
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)
        self.frozen = False

    def died(self) -> bool:
        """True when the process exited without stop()/kill() (a crash, or a config it rejected on restart)."""
        return self.proc is not None and not self.stopped_on_purpose and self.proc.poll() is not None

    # --- clients ---------------------------------------------------------------------------------------------------

    def client_args(self, username: str | None = None, password: str | None = None) -> list[str]:
        """mosquitto_pub/mosquitto_sub arguments for this broker: host, port, credentials, --cafile."""
        args = ["-h", self.host, "-p", str(self.port)]
        creds = (username, password or "") if username is not None else self.credentials()
        if creds is not None:
            args += ["-u", creds[0], "-P", creds[1]]
        if self.tls:
            assert self.ca_file is not None
            args += ["--cafile", str(self.ca_file)]
        return args

    async def pub(
        self,
        topic: str,
        payload: str | bytes | None,
        retain: bool = False,
        qos: int = 1,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        """Publish one message with mosquitto_pub (the broker's first user's credentials and its CA, unless
        username/password are given); payload None or b"" sends an empty message (retained: deletes the topic).
        Raises BrokerError when mosquitto_pub fails (refused login, unreachable)."""
        args = ["mosquitto_pub", *self.client_args(username, password), "-t", topic, "-q", str(qos)]
        if retain:
            args.append("-r")
        if client_id is not None:
            args += ["-i", client_id]
        data: bytes | None = None
        if payload is None or payload in (b"", ""):
            args.append("-n")
        else:
            data = payload.encode() if isinstance(payload, str) else payload
            args.append("-s")  # the payload from stdin: any bytes
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(data), 15)
        if proc.returncode != 0:
            raise BrokerError(
                f"mosquitto_pub -t {topic} exited {proc.returncode}: {(err or out).decode(errors='replace').strip()}"
            )


@dataclass
class Seen:
    at: float  # time.monotonic() when received
    topic: str
    payload: bytes
    retain: bool
    qos: int

    @property
    def text(self) -> str:
        return self.payload.decode(errors="replace")


class Watcher:
    """A test's own MQTT subscriber (aiomqtt) recording every message with its time.monotonic():

        async with Watcher(b, ["tele/+/LWT"]) as w:
            m = await w.wait_for(lambda m: m.topic == "tele/dev-1/LWT" and m.text == "Offline", 15)

    client_id + clean_session=False: a persistent session (QoS 1 messages published while it is away are queued
    by the broker and delivered when it connects again). Credentials and TLS are the broker's unless given."""

    def __init__(
        self,
        broker: Broker,
        topics: Sequence[str] = ("#",),
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.broker = broker
        self.topics = list(topics)
        self.client_id = client_id
        self.clean_session = clean_session
        self.qos = qos
        creds = (username, password) if username is not None else broker.credentials()
        self.username: str | None
        self.password: str | None
        self.username, self.password = creds if creds is not None else (None, None)
        self.messages: list[Seen] = []
        self._changed = asyncio.Event()
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    async def start(self) -> Watcher:
        """Connect and subscribe (returns once the SUBACK is in)."""
        import aiomqtt

        self._client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=self.client_id,
            clean_session=self.clean_session,
            username=self.username,
            password=self.password,
            tls_context=self.broker.ssl_context(),
            keepalive=10,
            timeout=10,
        )
        await self._client.__aenter__()
        for topic in self.topics:
            await self._client.subscribe(topic, qos=self.qos)
        self._task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for m in self._client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                self.messages.append(Seen(time.monotonic(), str(m.topic), payload, bool(m.retain), int(m.qos)))
                self._changed.set()
        except Exception as e:  # the broker went away: keep what was seen
            self.error = e
            self._changed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.__aexit__(None, None, None), 5)
            self._client = None

    async def __aenter__(self) -> Watcher:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def matching(self, pred: Callable[[Seen], bool]) -> list[Seen]:
        return [m for m in self.messages if pred(m)]

    async def wait_for(self, pred: Callable[[Seen], bool], timeout: float = 15.0) -> Seen:
        """The first message (already seen or arriving within `timeout`) that matches; AssertionError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(pred)
            if found:
                return found[0]
            left = deadline - time.monotonic()
            if left <= 0:
                last = [(m.topic, m.text) for m in self.messages[-5:]]
                raise AssertionError(f"no matching message within {timeout} s (last seen {last}, error {self.error})")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

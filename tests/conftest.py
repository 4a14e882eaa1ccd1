"""Shared fixtures: `store` for the in-process store tests; `daemon` and `receiver` for the whole-daemon tests;
`broker` and `devices` for the MQTT tests (a throwaway mosquitto, real MQTT device processes); `postgres`,
`pg_cluster` and `pg_url` for the PostgreSQL store (throwaway clusters)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload

import pytest

from tests.harness import Daemon, Receiver
from tests.mqtt_broker import Broker, missing_tools
from tests.mqtt_devices import Devices
from tests.postgres_cluster import SHARED_TEMPLATE_ENV, Cluster
from tests.postgres_cluster import missing_tools as missing_postgres
from webhookd.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An open Store on a fresh SQLite file."""
    s = Store(tmp_path / "webhookd.db")
    await s.open()
    yield s
    await s.close()


# --- whole-daemon tests: the real daemon and real receivers, stopped and checked at teardown ----------------------

_Server = TypeVar("_Server", bound="Startable")
_D = TypeVar("_D", bound=Daemon)


class Startable(Protocol):
    async def start(self) -> Any: ...

    async def stop(self) -> None: ...


class ReceiverFactory:
    """`await receiver()` is a started harness Receiver (its fields as keywords: `status=`, `port=`);
    `await receiver(ScriptedReceiver(...))` starts any server with async start()/stop(); `start=False` leaves it
    down (a receiver that comes up later). All of them are stopped at teardown, after the daemons."""

    def __init__(self) -> None:
        self.servers: list[Startable] = []

    @overload
    async def __call__(self, server: None = None, /, *, start: bool = True, **fields: Any) -> Receiver: ...

    @overload
    async def __call__(self, server: _Server, /, *, start: bool = True) -> _Server: ...

    async def __call__(self, server: Any = None, /, *, start: bool = True, **fields: Any) -> Any:
        if server is None:
            server = Receiver(**fields)
        elif fields:
            raise TypeError("fields are for the harness Receiver; configure a given server yourself")
        self.servers.append(server)
        if start:
            await server.start()
        return server

    async def stop_all(self) -> None:
        for server in reversed(self.servers):
            await server.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[ReceiverFactory]:
    """Real aiohttp receivers on 127.0.0.1 (any number), stopped at teardown."""
    factory = ReceiverFactory()
    yield factory
    await factory.stop_all()


class DaemonFactory:
    """`await daemon(endpoints, **overrides)` is `webhookd run` on a config written from the harness defaults
    plus `overrides` (listen=, presence=, delivery=, logging=, ...), started and ready. The first daemon lives in
    the test's tmp_path (config, state/, admin.sock, daemon.log), later ones in tmp_path/daemon-2, ...

    start=False: not started (call d.start(env=..., wrapper=...) yourself); env=: extra environment; cls=: a
    Daemon subclass; tmp=: another directory.

    At teardown each daemon still running is asked /healthz and stopped with SIGTERM; then it must have answered
    /healthz 200 when last asked (a test that stops it itself: stop() asks first) and exited 0, unless the test
    SIGKILLed it (d.kill()) and did not start it again; and its output must hold no Traceback and no error-level
    (or non-JSON) line. Opt-outs: allow_errors=True for a test whose daemon logs errors on purpose (the rest is
    still checked), check=False for one that expects it to fail (the test checks what it expects itself)."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.tmp_path = tmp_path
        self.request = request
        self.started: list[tuple[Daemon, bool, bool]] = []

    @overload
    async def __call__(
        self,
        endpoints: Sequence[dict[str, Any]] = (),
        /,
        *,
        cls: type[_D],
        start: bool = True,
        env: dict[str, str] | None = None,
        tmp: Path | None = None,
        check: bool = True,
        allow_errors: bool = False,
        **overrides: Any,
    ) -> _D: ...

    @overload
    async def __call__(
        self,
        endpoints: Sequence[dict[str, Any]] = (),
        /,
        *,
        start: bool = True,
        env: dict[str, str] | None = None,
        tmp: Path | None = None,
        check: bool = True,
        allow_errors: bool = False,
        **overrides: Any,
    ) -> Daemon: ...

    async def __call__(
        self,
        endpoints: Sequence[dict[str, Any]] = (),
        /,
        *,
        cls: type[Daemon] = Daemon,
        start: bool = True,
        env: dict[str, str] | None = None,
        tmp: Path | None = None,
        check: bool = True,
        allow_errors: bool = False,
        **overrides: Any,
    ) -> Daemon:
        if tmp is None:
            tmp = self.tmp_path if not self.started else self.tmp_path / f"daemon-{len(self.started) + 1}"
        tmp.mkdir(parents=True, exist_ok=True)
        d = cls(tmp, list(endpoints), **overrides)
        d.probe_on_stop = True
        self.started.append((d, check, allow_errors))
        if start:
            await d.start(env=env)
        return d

    async def teardown(self) -> None:
        report = getattr(self.request.node, "rep_call", None)
        test_failed = report is not None and report.failed  # then stop quietly: the failure says it already
        failures: list[str] = []
        for d, check, allow_errors in self.started:
            if d.running:
                await d.probe_healthz()
                try:
                    await d.stop()
                except AssertionError as e:  # it did not exit in time (wait_exit killed it)
                    failures.append(f"daemon in {d.tmp}: {str(e)[:3000]}")
                    continue
            if not check or test_failed or d.proc is None:
                continue
            problems = []
            if not d.killed:
                if d.last_healthz != 200:
                    problems.append(f"/healthz answered {d.last_healthz} when last asked before it stopped")
                if d.proc.returncode != 0:
                    problems.append(f"exit code {d.proc.returncode}")
            problems += d.problems(errors=not allow_errors)
            if problems:
                failures.append(f"daemon in {d.tmp}:\n  " + "\n  ".join(problems[:20]))
                failures.append("its output ends:\n" + d.logs_text()[-3000:])
        assert not failures, "\n".join(failures)


@pytest.fixture
async def daemon(
    tmp_path: Path, request: pytest.FixtureRequest, receiver: ReceiverFactory
) -> AsyncIterator[DaemonFactory]:
    """Real daemons as subprocesses; stopped and checked at teardown (see DaemonFactory). Depends on `receiver` so
    that receivers are stopped only after the daemons."""
    factory = DaemonFactory(tmp_path, request)
    yield factory
    await factory.teardown()


# --- MQTT tests: throwaway mosquitto brokers and real device processes, stopped by PID at teardown ----------------


class BrokerFactory:
    """`await broker(**options)` is a started tests.mqtt_broker.Broker (options: persistence=, passwords=, acl=,
    tls=, plain=, port=, max_keepalive=, autosave_interval=, extra=; start=False leaves it down). The first broker
    lives in tmp_path/broker, later ones in tmp_path/broker-2, ...

    Skips the test when mosquitto or mosquitto-clients are not installed (`make mosquitto-tools` installs them).
    At teardown every broker is stopped by its PID (SIGTERM, then SIGKILL); one that exited without stop()/kill()
    (a crash, a config it rejected on restart) fails the test with its log, unless the test failed already."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.tmp_path = tmp_path
        self.request = request
        self.brokers: list[Broker] = []

    async def __call__(self, *, start: bool = True, **options: Any) -> Broker:
        missing = missing_tools()
        if missing:
            pytest.skip(f"{' and '.join(missing)} not installed (make mosquitto-tools installs Debian's packages)")
        n = len(self.brokers) + 1
        b = Broker(self.tmp_path / ("broker" if n == 1 else f"broker-{n}"), **options)
        self.brokers.append(b)
        if start:
            await b.start()
        return b

    async def teardown(self) -> None:
        report = getattr(self.request.node, "rep_call", None)
        test_failed = report is not None and report.failed
        died = [b for b in self.brokers if b.died()]
        for b in reversed(self.brokers):
            await b.stop()
        if died and not test_failed:
            raise AssertionError(
                "\n".join(
                    f"broker {b.url} (pid {b.pid}) exited {b.proc and b.proc.returncode} on its own; its log "
                    f"ends:\n{b.log()[-3000:]}"
                    for b in died
                )
            )


@pytest.fixture
async def broker(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[BrokerFactory]:
    """Throwaway mosquitto brokers on free 127.0.0.1 ports (see BrokerFactory), stopped at teardown."""
    factory = BrokerFactory(tmp_path, request)
    yield factory
    await factory.teardown()


class DevicesFactory:
    """`await devices(broker_or_url, n_or_ids, **options)` is a started tests.mqtt_devices.Devices (`ready N`
    printed; options: preset=, keepalive=, prefix=, base=, topic=, online=, offline=, retain=, no_reconnect=,
    stay_down=, retry=, username=, password=, ca_file=, client_id_prefix=; start=False leaves it down). At teardown
    every process still running is stopped by PID (SIGCONT if frozen, SIGTERM, SIGKILL after 15 s)."""

    def __init__(self) -> None:
        self.fleets: list[Devices] = []

    async def __call__(
        self, target: Broker | str, devices: int | Sequence[str] = 1, /, *, start: bool = True, **options: Any
    ) -> Devices:
        d = Devices(target, devices, **options)
        self.fleets.append(d)
        if start:
            await d.start()
        return d

    async def teardown(self) -> None:
        for d in reversed(self.fleets):
            await d.stop()


@pytest.fixture
async def devices(broker: BrokerFactory) -> AsyncIterator[DevicesFactory]:
    """Real MQTT device processes (see DevicesFactory), stopped at teardown before the brokers."""
    factory = DevicesFactory()
    yield factory
    await factory.teardown()


# --- PostgreSQL: throwaway clusters (initdb + pg_ctl in a temp dir, a free 127.0.0.1 port), removed at teardown -------


def _skip_without_postgres() -> None:
    missing = missing_postgres()
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (make postgresql-tools installs Debian's postgresql)")


class PostgresFactory:
    """`await postgres()` is a started tests.postgres_cluster.Cluster of the test's own (start=False: initdb only);
    `cluster.create_db()` makes a fresh database and returns its URL. Skips the test when initdb/pg_ctl are not
    installed (`make postgresql-tools`). At teardown every cluster is stopped (`pg_ctl stop -m fast`) and its
    directory removed."""

    def __init__(self) -> None:
        self.clusters: list[Cluster] = []

    async def __call__(self, *, start: bool = True) -> Cluster:
        _skip_without_postgres()
        c = Cluster()
        self.clusters.append(c)
        if start:
            c.start()
        return c

    def teardown(self) -> None:
        for c in reversed(self.clusters):
            c.remove()


@pytest.fixture
async def postgres() -> AsyncIterator[PostgresFactory]:
    """Throwaway PostgreSQL clusters of one test (see PostgresFactory): for tests that stop or break theirs."""
    factory = PostgresFactory()
    yield factory
    factory.teardown()


def pytest_configure(config: pytest.Config) -> None:
    """In the run's first process (pytest-xdist's controller, or the only one): a directory for the run's shared
    PostgreSQL template (tests/postgres_cluster.py), inherited by the workers through the environment."""
    if hasattr(config, "workerinput") or os.environ.get(SHARED_TEMPLATE_ENV):
        return
    shared = tempfile.mkdtemp(prefix="webhookd-pg-run-")
    os.environ[SHARED_TEMPLATE_ENV] = shared
    config.stash[_shared_template_key] = shared


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(_shared_template_key, None)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)
        os.environ.pop(SHARED_TEMPLATE_ENV, None)


_shared_template_key = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throwaway cluster per test process (each pytest-xdist worker has its own), shared by `pg_url`."""
    _skip_without_postgres()
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.remove()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh, empty database in the session's cluster (its URL), dropped at teardown."""
    url = pg_cluster.create_db()
    yield url
    pg_cluster.drop_db(url)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Keep the call phase's report on the item (`rep_call`): the daemon fixture's teardown reads it."""
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report

"""A throwaway PostgreSQL cluster for the tests: `initdb` + `pg_ctl` in a temp dir on a free 127.0.0.1 port.

fsync stays on (the store's durability is what is tested), trust auth on 127.0.0.1 only, no Unix socket. When we
are root the server runs as the `postgres` system user (PostgreSQL refuses root): the data dir is made outside
pytest's tmp dirs (those are 0700 root) and chowned to it. `stop()` is `pg_ctl stop -m fast`; `remove()` deletes
the directory. Debian's binaries live in /usr/lib/postgresql/<version>/bin (`make postgresql-tools` installs them).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

TOOLS = ("initdb", "pg_ctl")
_template: Path | None = None  # a fresh initdb's data dir, copied for every later cluster of this process
# A directory for the test run's template (made and removed by tests/conftest.py in the controller, inherited by the
# pytest-xdist workers): one initdb per run instead of one per worker.
SHARED_TEMPLATE_ENV = "WEBHOOKD_TEST_PG_TEMPLATE_DIR"


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are (PATH first, then Debian's newest /usr/lib/postgresql/*/bin)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if all(os.access(os.path.join(d, t), os.X_OK) for t in TOOLS):
            return Path(d)
    return None


def missing_tools() -> list[str]:
    if bin_dir() is not None:
        return []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return ["the postgres system user"]
    return list(TOOLS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One PostgreSQL cluster; `url(db)` names one of its databases (user `postgres`, no password)."""

    def __init__(self) -> None:
        bins = bin_dir()
        if bins is None:
            raise RuntimeError("initdb/pg_ctl not found")
        self.bins = bins
        self.root = Path(tempfile.mkdtemp(prefix="webhookd-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = 0
        self.running = False
        self.as_postgres = os.geteuid() == 0
        self._next_db = 0
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        shared = os.environ.get(SHARED_TEMPLATE_ENV)
        if shared and Path(shared).is_dir():
            self._from_shared_template(Path(shared))
        else:
            self._from_own_template()
        # Only TCP on 127.0.0.1, trust there and nowhere else.
        (self.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(
                "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nfsync = on\n"
                "synchronous_commit = on\nshared_buffers = 32MB\nmax_connections = 60\n"
            )

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale")

    def _from_own_template(self) -> None:
        global _template
        if _template is None or not _template.exists():
            # initdb once per test process (~2.5 s); later clusters start from a copy of it (cp -a keeps the owner).
            self._initdb()
            _template = Path(tempfile.mkdtemp(prefix="webhookd-pg-template-"))
            subprocess.run(["cp", "-a", f"{self.data}/.", str(_template)], check=True)
            atexit.register(shutil.rmtree, _template, True)
        else:
            subprocess.run(["cp", "-a", str(_template), str(self.data)], check=True)

    def _from_shared_template(self, shared: Path) -> None:
        """initdb once per test run: the first process (of all the pytest-xdist workers) to need a cluster makes the
        template under a lock, the others copy it. The run's controller made `shared` and removes it."""
        template = shared / "data"
        with (shared / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not template.exists():
                    self._initdb()
                    partial = shared / f"data.{os.getpid()}"
                    subprocess.run(["cp", "-a", f"{self.data}/.", str(partial)], check=True)
                    partial.rename(template)
                    return
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        subprocess.run(["cp", "-a", str(template), str(self.data)], check=True)

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bins / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=self.root)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n{self.log()[-2000:]}")
        return proc

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        """pg_ctl start on the cluster's port (a free one the first time; the same one again later)."""
        for attempt in range(5):
            port = self.port or free_port()
            proc = self._run(
                "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log_path),
                "-o", f"-p {port}", check=False,
            )  # fmt: skip
            if proc.returncode == 0:
                self.port = port
                self.running = True
                return
            if self.port or attempt == 4:  # the same port again: no other to try
                raise RuntimeError(f"pg_ctl start failed: {proc.stdout}{proc.stderr}\n{self.log()[-2000:]}")

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data), check=False)
            self.running = False

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self) -> str:
        """A fresh, empty database; returns its URL."""
        self._next_db += 1
        name = f"t{os.getpid()}_{self._next_db}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def drop_db(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(psycopg.Error), psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]

"""systemd/webhookd.service (CONTRACT §10): systemd's own checker, the contract's directives, and the daemon run
under the kernel restrictions the unit asks for (MemoryDenyWriteExecute=, ProtectProc=)."""

from __future__ import annotations

import asyncio
import mmap
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import stripe
import yaml

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import SECRET, NotifySocket, endpoint
from webhookd import daemon

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "webhookd.service"
VENV_WEBHOOKD = Path(sys.executable).parent / "webhookd"
CONFIG = "/etc/webhookd/config.yaml"

NO_ANALYZE = (
    "systemd-analyze is not installed and could not be: `make test` installs Debian's `systemd` package "
    "(apt-get, as root); on other systems install systemd's tools by hand"
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value in order (systemd allows repeated keys; an empty one resets the list)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical.append(line[:-1].strip())
            continue
        line = " ".join([*logical, line]).strip()
        logical = []
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def proc_mount_options(text: str | None = None) -> list[str]:
    """The procfs options systemd mounts the service's private /proc with, from the unit's ProtectProc= and
    ProcSubset= (systemd.exec(5)): hidepid= for ProtectProc= other than "default", subset=pid for ProcSubset=pid."""
    svc = {k: v[-1] for k, v in parse_unit(UNIT.read_text() if text is None else text)["Service"].items()}
    options = []
    if svc.get("ProtectProc", "default") != "default":
        options.append(f"hidepid={svc['ProtectProc']}")
    if svc.get("ProcSubset", "all") == "pid":
        options.append("subset=pid")
    return options


def private_proc(options: list[str]) -> tuple[str, ...]:
    """A wrapper (to run inside `unshare --mount`) that mounts a fresh /proc with `options`, then execs argv."""
    opts = ",".join(options) or "defaults"
    return ("sh", "-c", f'mount -t proc -o {opts} proc /proc && exec "$@"', "sh")


def unit_for_verify(tmp: Path, text: str | None = None) -> Path:
    """The unit with ExecStart= and ExecReload= pointing at this venv's `webhookd`: verify checks that the binaries
    exist."""
    text = UNIT.read_text() if text is None else text
    assert "ExecStart=/usr/local/bin/webhookd " in text and "ExecReload=/usr/local/bin/webhookd " in text
    path = tmp / "webhookd.service"
    for key in ("ExecStart", "ExecReload"):
        text = text.replace(f"{key}=/usr/local/bin/webhookd ", f"{key}={VENV_WEBHOOKD} ")
    path.write_text(text)
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip(NO_ANALYZE)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def about_unit(output: str) -> list[str]:
    # verify also loads the unit's dependencies (network-online.target, ...): judge only what concerns ours
    return [line for line in output.splitlines() if "webhookd" in line]


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    assert VENV_WEBHOOKD.exists(), VENV_WEBHOOKD
    out = analyze("verify", "--man=no", str(unit_for_verify(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    # verify exits 0 on settings it ignores (typos, bad values): any line about the unit is a failure
    assert about_unit(out.stdout + out.stderr) == []


def test_verify_would_catch_a_typo_or_a_bad_value(tmp_path: Path) -> None:
    # the check above is only worth something if verify speaks up about mistakes in our unit
    text = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    text = text.replace("WatchdogSec=30s", "WatchdogSec=thirty")
    out = analyze("verify", "--man=no", str(unit_for_verify(tmp_path, text)))
    lines = "\n".join(about_unit(out.stdout + out.stderr))
    assert "ProtectSytem" in lines and "thirty" in lines, lines


def test_security_exposure_is_low(tmp_path: Path) -> None:
    out = analyze("security", "--offline=yes", "--no-pager", str(unit_for_verify(tmp_path)))
    if out.returncode != 0 and "offline" in out.stderr and "unrecognized" in out.stderr:
        pytest.skip("this systemd-analyze has no `security --offline` (needs systemd >= 250)")
    assert out.returncode == 0, out.stderr
    m = re.search(r"Overall exposure level for webhookd\.service: (\d+\.\d+)", out.stdout)
    assert m is not None, out.stdout
    assert float(m.group(1)) <= 2.0, out.stdout  # "OK" on systemd's 0-10 scale (10 = unprotected)


def test_unit_has_what_the_contract_and_the_daemon_need() -> None:
    unit = parse_unit(UNIT.read_text())
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["Type"] == "notify"
    assert svc["ExecStart"] == f"/usr/local/bin/webhookd run -c {CONFIG}"
    # a reload checks the file first (systemd stops at the first ExecReload= that fails), with the file ExecStart runs
    assert unit["Service"]["ExecReload"] == [
        f"/usr/local/bin/webhookd check-config -c {CONFIG}",
        "/bin/kill -HUP $MAINPID",
    ]
    env = " ".join(unit["Service"]["Environment"]).split()
    assert f"WEBHOOKD_CONFIG={CONFIG}" in env  # the CLI finds the same config as the service
    assert svc["Restart"] == "on-failure"
    assert svc["DynamicUser"] == "yes"
    for key in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert svc[key] == "webhookd", key
    assert svc["UMask"] == "0007"

    def seconds(v: str) -> float:
        m = re.fullmatch(r"(\d+)(ms|s|min)?", v)
        assert m is not None, v
        return int(m.group(1)) * {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[m.group(2)]

    # the daemon pings at half WatchdogSec; the stop timeout leaves room for the delivery drain and the close
    assert 10 <= seconds(svc["WatchdogSec"]) <= 120
    assert seconds(svc["TimeoutStopSec"]) >= daemon.DRAIN_MAX + 5
    assert seconds(svc["RestartSec"]) >= 1

    hardening = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "ProtectProc": "invisible",
    }
    assert {k: svc.get(k) for k in hardening} == hardening
    # ProcSubset=pid hides /proc/stat, and with it every process_* metric (tests/test_unit_proc.py)
    assert svc.get("ProcSubset", "all") == "all"
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# --- the daemon under the unit's kernel restrictions ---------------------------------------------------------

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # Linux >= 6.3: what MemoryDenyWriteExecute= uses when it can

# prctl(PR_SET_MDWE) then exec the rest of argv: the restriction survives execve, as under systemd.
MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit(f'prctl(PR_SET_MDWE): errno {ctypes.get_errno()}')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
# The unit's private /proc (ProtectProc=invisible: only our own processes), mounted as systemd mounts it.
UNIT_PROC = private_proc(proc_mount_options())


def _mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", "pass"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def _wx_mapping_refused() -> bool:
    code = (
        "import mmap\n"
        "try:\n"
        f"    mmap.mmap(-1, 4096, prot={mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC})\n"
        "except OSError:\n"
        "    print('refused')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip() == "refused"


def _private_proc_works() -> bool:
    out = subprocess.run(
        ["unshare", "--mount", *UNIT_PROC, "test", "-e", "/proc/self/stat"], capture_output=True, timeout=30
    )
    return out.returncode == 0


async def test_daemon_works_under_memory_deny_write_execute_and_a_private_proc(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    if platform.system() != "Linux" or not _mdwe_supported():
        pytest.skip("the kernel has no prctl(PR_SET_MDWE) (Linux >= 6.3) to stand in for MemoryDenyWriteExecute=")
    assert _wx_mapping_refused()  # the stand-in really refuses writable+executable memory
    wrapper: tuple[str, ...] = (sys.executable, "-c", MDWE_EXEC)
    private_proc = shutil.which("unshare") is not None and _private_proc_works()
    if private_proc:
        wrapper = ("unshare", "--mount", *UNIT_PROC, *wrapper)

    r = await receiver()
    d = await daemon([endpoint("r", r, signature="hmac-sha256")], start=False)
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env(WATCHDOG_USEC="400000", WATCHDOG_PID=""), wrapper=wrapper)
        await ns.wait_for("READY", "1")
        assert (await d.heartbeat("sandboxed", name="Box"))["changed"] is True
        got = (await r.wait_for(1))[0]
        stripe.WebhookSignature.verify_header(got.body.decode(), got.headers["Webhookd-Signature"], SECRET, 300)
        mark = len(ns.messages)
        d.signal(signal.SIGHUP)
        await ns.wait_for("READY", "1", since=mark)
        await asyncio.sleep(0.3)
        assert ns.having("WATCHDOG", "1", since=mark)
        out = await d.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        assert await d.stop() == 0
    assert not [rec for rec in d.logs() if rec.get("level") in ("error", "critical")]


def test_install_doc_config_is_valid_and_matches_the_unit() -> None:
    from webhookd.config import parse_config

    doc = (ROOT / "docs" / "install.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", doc, re.DOTALL)
    assert block is not None
    env = {"OPS_SECRET": "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk=", "HEARTBEAT_TOKEN": "t" * 32}
    cfg = parse_config(yaml.safe_load(block.group(1)), Path("/etc/webhookd"), env, Path(CONFIG))
    unit = {k: v[-1] for k, v in parse_unit(UNIT.read_text())["Service"].items()}
    # the config's paths are the directories systemd creates for the service
    assert cfg.state_dir == Path("/var/lib") / unit["StateDirectory"]
    assert cfg.admin.socket.parent == Path("/run") / unit["RuntimeDirectory"]
    assert Path(CONFIG).parent == Path("/etc") / unit["ConfigurationDirectory"]
    assert cfg.logging.format == "auto"
    # every command the doc runs against the unit names the unit's own paths
    assert "install -m 0644 systemd/webhookd.service /etc/systemd/system/webhookd.service" in doc
    assert "ln -sf /opt/webhookd/bin/webhookd /usr/local/bin/webhookd" in doc
    assert unit["EnvironmentFile"].lstrip("-") in doc


# --- ExecReload= by hand: what `systemctl reload` runs, against a real daemon --------------------------------


def exec_reload(config: Path, pid: int) -> list[subprocess.CompletedProcess[str]]:
    """The unit's ExecReload= lines run as systemd runs them: in order, stopping at the first that fails (the
    reload job's result is then "failed": `systemctl reload` exits non-zero). This venv's webhookd and the
    test's config stand in for /usr/local/bin/webhookd and /etc/webhookd/config.yaml."""
    if not Path("/bin/kill").exists():
        pytest.skip("/bin/kill is missing: `make test` installs Debian's procps package")
    done: list[subprocess.CompletedProcess[str]] = []
    for line in parse_unit(UNIT.read_text())["Service"]["ExecReload"]:
        line = line.replace("/usr/local/bin/webhookd ", f"{VENV_WEBHOOKD} ").replace(CONFIG, str(config))
        out = subprocess.run(
            shlex.split(line.replace("$MAINPID", str(pid))), capture_output=True, text=True, timeout=60
        )
        done.append(out)
        if out.returncode != 0:
            break
    return done


async def test_exec_reload_fails_on_a_broken_file_and_leaves_the_daemon_alone(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], start=False)
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        await ns.wait_for("READY", "1")
        assert d.proc is not None
        pid = d.proc.pid
        good = d.config_path.read_text()

        d.config_path.write_text("endpoints: [\n  - {name: r\n")  # not YAML
        mark = len(ns.messages)
        ran = await asyncio.to_thread(exec_reload, d.config_path, pid)
        assert len(ran) == 1, ran  # check-config failed: no SIGHUP was sent
        assert ran[0].returncode == 1
        assert ran[0].stderr.startswith(f"config error: {d.config_path}: invalid YAML at line"), ran[0].stderr
        await asyncio.sleep(0.5)
        assert not ns.having("RELOADING", "1", since=mark)
        assert not [rec for rec in d.logs() if rec.get("event", "").startswith("config_reload")]
        assert d.proc.poll() is None
        assert (await d.heartbeat("still-running"))["changed"] is True

        # the file fixed: both lines run, the daemon reloads
        d.config_path.write_text(good)
        ran = await asyncio.to_thread(exec_reload, d.config_path, pid)
        assert [out.returncode for out in ran] == [0, 0], ran
        assert ran[0].stdout.startswith("config OK:"), ran[0].stdout
        started = await ns.wait_for("RELOADING", "1", since=mark)
        await ns.wait_for("READY", "1", since=ns.messages.index(started) + 1)
        assert [rec["changed"] for rec in d.logs() if rec.get("event") == "config_reloaded"] == [[]]
        assert await d.stop() == 0

"""prometheus_client's process metrics under the unit's /proc (issue 10, item 8).

systemd gives the service a private procfs mounted with the options of its ProtectProc= and ProcSubset=. With
ProcSubset=pid, /proc/stat (the boot time) is gone, and prometheus_client's ProcessCollector then reports no
process_* metric at all, with no error. Here a fresh procfs is mounted by hand with the unit's options
(`unshare --mount`, then `mount -t proc -o ...`, as root) and the process metrics are looked for inside it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import endpoint
from tests.test_systemd import UNIT, private_proc, proc_mount_options

PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_start_time_seconds",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
}

# What a ProcessCollector in its own registry reports, as {sample name: value}, and whether /proc/stat is there.
PROBE = (
    "import json, os\n"
    "from prometheus_client import CollectorRegistry\n"
    "from prometheus_client.process_collector import ProcessCollector\n"
    "r = CollectorRegistry()\n"
    "ProcessCollector(registry=r)\n"
    "samples = {s.name: s.value for m in r.collect() for s in m.samples}\n"
    "print(json.dumps({'proc_stat': os.path.exists('/proc/stat'), 'samples': samples}))\n"
)


def _in_private_proc(options: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--mount", *private_proc(options), *argv], capture_output=True, text=True, timeout=60
    )


def _need_private_proc(options: list[str]) -> None:
    """Skip unless this box lets us mount a procfs with `options` in a new mount namespace."""
    if sys.platform != "linux":
        pytest.skip("a private procfs is Linux only")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    out = _in_private_proc(options, "true")
    if out.returncode != 0:
        pytest.skip(
            f"cannot mount a private /proc with -o {','.join(options) or 'defaults'} "
            f"(needs root, unshare and mount allowed, Linux >= 5.8 for subset=pid): {out.stderr.strip()}"
        )


async def _metric_names(admin_socket: Path) -> set[str]:
    conn = aiohttp.UnixConnector(path=str(admin_socket))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://webhookd/metrics") as r:
        assert r.status == 200
        return {sample.name for family in text_string_to_metric_families(await r.text()) for sample in family.samples}


def _probe(options: list[str]) -> dict:
    out = _in_private_proc(options, sys.executable, "-c", PROBE)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_check_sees_proc_subset_pid_hide_the_process_metrics() -> None:
    # the check below is worth something only if it catches ProcSubset=pid coming back
    text = UNIT.read_text().replace("ProtectProc=invisible\n", "ProtectProc=invisible\nProcSubset=pid\n", 1)
    options = proc_mount_options(text)
    assert "subset=pid" in options
    _need_private_proc(options)
    got = _probe(options)
    assert got["proc_stat"] is False
    assert not PROCESS_METRICS & set(got["samples"]), got  # every one gone, and nothing said so


def test_process_metrics_are_present_under_the_units_proc() -> None:
    options = proc_mount_options()
    _need_private_proc(options)
    got = _probe(options)
    assert got["proc_stat"] is True
    samples = got["samples"]
    assert set(samples) >= PROCESS_METRICS, samples
    assert 0 < time.time() - samples["process_start_time_seconds"] < 600  # the probe started moments ago
    assert samples["process_cpu_seconds_total"] > 0
    assert samples["process_resident_memory_bytes"] > 0


async def test_daemon_serves_process_metrics_under_the_units_proc(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    options = proc_mount_options()
    _need_private_proc(options)
    r = await receiver()
    d = await daemon([endpoint("r", r)], start=False)
    await d.start(wrapper=("unshare", "--mount", *private_proc(options)))
    names = await _metric_names(d.tmp / "admin.sock")
    assert names >= PROCESS_METRICS, sorted(n for n in names if n.startswith("process_"))
    assert await d.stop() == 0

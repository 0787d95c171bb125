"""The worker's metrics port (issue 19 item 3: bound to 127.0.0.1 unless --metrics-host says otherwise, and never
held by a child process) and its cached `doctor` speed (item 10: measured again when the machine's devices, the
GPU driver or torch change)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import torch

from tests.conftest import run_cli
from tests.coordinator.conftest import free_port
from worker.daemon import WorkerConfig
from worker.hardware import Device, benchmark_key, cached_benchmark, driver_version, probe_devices
from worker.metrics import PrometheusMetrics


def sockets_of(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return {x for x in out if x.startswith("socket:")}


def can_bind(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_metrics_listen_on_loopback_unless_told_and_the_flag_is_documented(tmp_path):
    port = free_port()
    m = PrometheusMetrics(port)
    try:
        assert m._server.server_address[0] == "127.0.0.1"
    finally:
        m.close()
    (tmp_path / "worker.toml").write_text('coordinator = "127.0.0.1:1"\ntoken = "t"\nmetrics_host = "0.0.0.0"\n')
    assert WorkerConfig.load(tmp_path / "worker.toml").metrics_host == "0.0.0.0"
    assert WorkerConfig(coordinator="127.0.0.1:1", token="t").metrics_host == "127.0.0.1"
    helptext = run_cli("worker.cli", "run", "--help").stdout
    assert "--metrics-host" in helptext and "127.0.0.1" in helptext


def test_children_do_not_hold_the_metrics_port(tmp_path):
    """A fork()ed child (hivemind's DHT process is one) and a spawned program both live on after the daemon
    closed its metrics server: neither holds the listening socket, so the port can be bound again at once."""
    port = free_port()
    m = PrometheusMetrics(port)
    listening = f"socket:[{os.fstat(m._server.socket.fileno()).st_ino}]"
    assert listening in sockets_of(os.getpid())
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    forked = os.fork()
    if forked == 0:  # the child: say it runs (fork's after-hooks are done), wait for the parent, leave uncleaned
        os.close(w)
        os.write(ready_w, b"r")
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r"  # look at the child only once fork() returned in it (else a race)
    os.close(ready_r)
    spawned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=False)
    try:
        deadline = time.monotonic() + 10  # the spawned child's exec replaces its fds once it starts
        while time.monotonic() < deadline and listening in sockets_of(spawned.pid):
            time.sleep(0.05)
        assert listening not in sockets_of(forked)
        assert listening not in sockets_of(spawned.pid)
        m.close()
        assert can_bind(port)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(forked, 0)
        spawned.kill()
        spawned.wait()


def test_the_cached_speed_is_measured_again_when_devices_driver_or_torch_change(tmp_path):
    cpu = Device("cpu", 0, "test-cpu", 8 << 30)
    machine = [Device("cuda", 0, "RTX 4090", 24 << 30), cpu]
    key = benchmark_key(cpu, machine, driver="NVRM version: 550.54", torch_version="2.5.0")
    assert len({key,
                benchmark_key(cpu, machine, driver="NVRM version: 560.35", torch_version="2.5.0"),
                benchmark_key(cpu, machine, driver="NVRM version: 550.54", torch_version="2.6.0"),
                benchmark_key(cpu, [Device("cuda", 0, "RTX 5090", 32 << 30), cpu], driver="NVRM version: 550.54",
                              torch_version="2.5.0"),
                benchmark_key(cpu, [cpu], driver="NVRM version: 550.54", torch_version="2.5.0")}) == 5
    # the default key is this machine now: every device found, its driver and this torch
    now = benchmark_key(cpu)
    assert torch.__version__ in now and f"driver {driver_version()}" in now
    assert all(d.name in now for d in probe_devices().devices)
    # a speed cached under the current key is reused; one cached for another driver is not
    (tmp_path / "benchmark.json").write_text(json.dumps({now: 123.0, key: 456.0}))
    assert cached_benchmark(tmp_path, cpu) == 123.0
    (tmp_path / "benchmark.json").write_text(json.dumps({key: 456.0}))
    measured = cached_benchmark(tmp_path, cpu)
    assert measured not in (123.0, 456.0) and json.loads((tmp_path / "benchmark.json").read_text())[now] == measured

"""What this machine can run: devices (and why none), memory, a short cached benchmark, the doctor report.

    probe = probe_devices(["cuda:0"])          # or None: every device found
    probe.devices, probe.why_no_gpu            # [Device(kind="cuda", ...)], "" or a sentence saying why
    speed = cached_benchmark(cache_dir, probe.devices[0].torch_device)   # model tokens/s, sent at Register
    report = doctor(cache_dir, coordinator="host:50051", token="mj_...")  # what `mujina-worker doctor` prints

The benchmark is the forward pass of a small Transformer (model/): the same kind of work a task does,
so the coordinator's `min_speed` compares like with like. Its result is cached per machine fingerprint
(every device found, the GPU driver's version, torch's version and the benchmark's), because it costs a few
seconds and a restart must not pay it again; new hardware, a driver update or another torch measure again.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BENCHMARK_VERSION = 1
# Task kinds and the modules their executors need beyond torch (an executor whose modules are
# missing cannot run, and doctor says which to install).
KIND_NEEDS = {"generate": ("transformers",), "judge": ("transformers",), "eval": (), "train": ("hivemind",)}


@dataclass
class Device:
    kind: str           # "cuda", "mps" or "cpu"
    index: int
    name: str
    memory_bytes: int   # device memory (host memory for the CPU)

    @property
    def torch_device(self) -> str:
        return self.kind if self.kind != "cuda" else f"cuda:{self.index}"


@dataclass
class Probe:
    devices: list[Device]
    host_memory_bytes: int
    why_no_gpu: str = ""                         # empty when an accelerator was found
    software: dict[str, str] = field(default_factory=dict)

    @property
    def accelerators(self) -> list[Device]:
        return [d for d in self.devices if d.kind != "cpu"]


def parse_size(text: str | int) -> int:
    """'12GiB', '500MB', '1.5G', 4096 -> bytes (binary units for GiB/G, decimal for GB)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}: write e.g. 12GiB, 500MB or 1073741824")
    number, unit, binary, _ = m.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    base = 1024 if (binary or not _) else 1000
    return int(float(number) * base ** power)


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _why_no_cuda() -> str:
    """One sentence on why torch sees no CUDA device: the usual causes, most specific first."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build "
                "(pip install torch --index-url https://download.pytorch.org/whl/cu126)")
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return "no /dev/nvidia* device files: is the NVIDIA driver installed and loaded (nvidia-smi)?"
    if not all(os.access(p, os.R_OK | os.W_OK) for p in Path("/dev").glob("nvidia[0-9]*")):
        return "no permission on /dev/nvidia*: add this user to the video group or run in the container with --gpus"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) found no usable device: "
            "check that the driver supports this CUDA version (nvidia-smi) and CUDA_VISIBLE_DEVICES")


def probe_devices(wanted: list[str] | None = None) -> Probe:
    """Every device torch can use, or those in `wanted` ("cuda:0", "cpu", "mps"); ValueError for a
    wanted device that does not exist. The CPU is always listed last as a fallback."""
    host = host_memory_bytes()
    found: list[Device] = []
    why = ""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append(Device("cuda", i, p.name, int(p.total_memory)))
    else:
        why = _why_no_cuda()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append(Device("mps", 0, "Apple MPS", host))
        why = ""
    found.append(Device("cpu", 0, platform.processor() or platform.machine(), host))
    if wanted:
        by_name = {d.torch_device: d for d in found}
        by_name.setdefault("cuda", next((d for d in found if d.kind == "cuda"), None))
        missing = [w for w in wanted if by_name.get(w) is None]
        if missing:
            raise ValueError(f"--devices {','.join(missing)}: no such device here (found: "
                             f"{', '.join(d.torch_device for d in found)}){'; ' + why if why else ''}")
        found = [by_name[w] for w in wanted]
    software = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "vllm", "bitsandbytes", "hivemind"):
        if importlib.util.find_spec(mod) is not None:
            software[mod] = "installed"
    return Probe(found, host, why, software)


def runnable_kinds(kinds: list[str] | None = None) -> dict[str, str]:
    """{kind: ""} for kinds whose executor's modules are importable, {kind: "needs X"} otherwise."""
    out = {}
    for kind, needs in KIND_NEEDS.items():
        if kinds is not None and kind not in kinds:
            continue
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if importlib.util.find_spec(f"worker.executors.{kind}") is None:
            missing.append(f"worker/executors/{kind}.py (not in this version of mujina)")
        out[kind] = f"needs {', '.join(missing)}" if missing else ""
    return out


def benchmark(device: str = "cpu", seconds: float = 1.0) -> float:
    """Forward tokens/s of a small Transformer on `device`, measured for about `seconds`."""
    from model import ModelConfig, Transformer

    cfg = ModelConfig.from_dict({"preset": "debug"})
    torch.manual_seed(0)
    net = Transformer(cfg).to(device).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, min(128, cfg.max_seq_len)), device=device)
    with torch.no_grad():
        net(ids)  # warm-up (allocations, kernels)
        tokens, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            net(ids)
            tokens += ids.numel()
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # a CPU-GPU sync point: the queued kernels must finish to be counted
        return tokens / (time.perf_counter() - t0)


def driver_version() -> str:
    """The NVIDIA kernel driver's version line ('' without one): an update can change the speed."""
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return ""


def benchmark_key(device: Device, devices: list[Device] | None = None, driver: str | None = None,
                  torch_version: str | None = None) -> str:
    """What a cached speed is valid for: the measured device, every device of the machine (a swapped or added
    card), the driver and torch. Defaults: this machine now."""
    if devices is None:
        devices = probe_devices().devices
    machine = ",".join(f"{d.kind}:{d.index}:{d.name}:{d.memory_bytes}" for d in devices)
    return (f"{device.kind}:{device.index}:{device.name}|machine {machine}"
            f"|driver {driver_version() if driver is None else driver}"
            f"|torch {torch.__version__ if torch_version is None else torch_version}|v{BENCHMARK_VERSION}")


def cached_benchmark(cache_dir: str | os.PathLike, device: Device, key: str | None = None) -> float:
    """`benchmark` on `device`, cached in CACHE_DIR/benchmark.json under `benchmark_key` (this machine's
    fingerprint, unless `key` is given)."""
    path = Path(cache_dir) / "benchmark.json"
    key = key or benchmark_key(device)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(key), int | float):
        return float(cached[key])
    speed = benchmark(device.torch_device)
    cached[key] = speed
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cached, indent=2) + "\n")
    os.replace(tmp, path)
    log.info("benchmark on %s: %.0f tokens/s (cached in %s)", device.torch_device, speed, path)
    return speed


def check_coordinator(target: str, token: str, timeout: float = 5.0, tls: bool = False,
                      ca_cert=None) -> tuple[bool, str]:
    """(ok, message): is the coordinator reachable, and does it accept this token?

    Uses the `Lease` RPC with an unknown worker id: a valid token gets NOT_FOUND (unknown worker),
    an invalid one UNAUTHENTICATED; nothing is registered and nothing is leased."""
    import grpc

    from .transport import coordinator_client

    with coordinator_client(target, token, tls, ca_cert, timeout=timeout, retry_for=0) as c:
        try:
            c.lease("doctor-check", ["eval"])
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return True, f"{target} is reachable and accepts the token"
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return False, f"{target} is reachable but refuses the token ({err.details()}): ask the organizer"
            return False, f"{target}: {code.name} ({err.details()}); is the address right and the server up?"
    return False, f"{target} answered Lease for an unknown worker: not a mujina coordinator?"


TEACHER_KINDS = ("generate", "judge")


def check_teachers(teachers: dict[str, Path]) -> dict[str, str]:
    """{name: ""} for each teacher this worker can load, {name: why not} otherwise."""
    from .executors.teacher import check_teacher

    return {name: check_teacher(Path(path)) for name, path in teachers.items()}


def doctor(cache_dir: str | os.PathLike, devices: list[str] | None = None, coordinator: str | None = None,
           token: str | None = None, kinds: list[str] | None = None, bench: bool = True, tls: bool = False,
           ca_cert=None, teachers: dict[str, Path] | None = None) -> dict:
    """The report of `mujina-worker doctor`; `report["ok"]` is True when at least one task kind can run.
    generate and judge need a teacher (`teachers`: name -> directory), each of which is loaded (config,
    tokenizer) and must have a chat template."""
    unknown = [k for k in kinds or () if k not in KIND_NEEDS]
    if unknown:
        raise ValueError(f"--kinds {','.join(unknown)}: no such task kind; known: {', '.join(KIND_NEEDS)}")
    report: dict = {"ok": False}
    try:
        probe = probe_devices(devices)
    except ValueError as err:
        report["error"] = str(err)
        return report
    report["devices"] = [asdict(d) for d in probe.devices]
    report["why_no_gpu"] = probe.why_no_gpu
    report["host_memory_bytes"] = probe.host_memory_bytes
    report["software"] = probe.software
    if bench:
        report["speed_tokens_per_s"] = round(cached_benchmark(cache_dir, probe.devices[0]), 1)
    report["kinds"] = runnable_kinds(kinds)
    wants_teacher = [k for k in TEACHER_KINDS if report["kinds"].get(k) == ""]
    if wants_teacher:
        report["teachers"] = check_teachers(teachers or {})
        bad = [f"teacher {n!r}: {why}" for n, why in report["teachers"].items() if why]
        why = "; ".join(bad) if bad else "" if report["teachers"] else "no teacher: pass --teacher NAME=DIR"
        for k in wants_teacher:
            report["kinds"][k] = why
    if coordinator:
        ok, message = check_coordinator(coordinator, token or "", tls=tls, ca_cert=ca_cert)
        report["coordinator"] = {"ok": ok, "message": message}
    else:
        ok = True
    report["ok"] = ok and any(v == "" for v in report["kinds"].values())
    return report


def format_report(report: dict) -> str:
    lines = []
    if "error" in report:
        return f"error: {report['error']}\nresult: cannot run"
    for d in report["devices"]:
        lines.append(f"device   {d['kind']}:{d['index']}  {d['name']}  {d['memory_bytes'] / 2**30:.1f} GiB")
    if report["why_no_gpu"]:
        lines.append(f"no GPU   {report['why_no_gpu']}")
    lines.append(f"memory   {report['host_memory_bytes'] / 2**30:.1f} GiB host")
    lines.append("software " + ", ".join(f"{k} {v}" for k, v in report["software"].items()))
    if "speed_tokens_per_s" in report:
        lines.append(f"speed    {report['speed_tokens_per_s']:.0f} tokens/s (benchmark, sent at Register)")
    for name, why in report.get("teachers", {}).items():
        lines.append(f"teacher  {name:<9} {'ok' if not why else 'no: ' + why}")
    for kind, why in report["kinds"].items():
        lines.append(f"kind     {kind:<9} {'ok' if not why else 'no: ' + why}")
    if "coordinator" in report:
        c = report["coordinator"]
        lines.append(f"server   {'ok' if c['ok'] else 'FAIL'}: {c['message']}")
    lines.append("result   " + ("ready: at least one task kind can run" if report["ok"] else "cannot run (see above)"))
    return "\n".join(lines)

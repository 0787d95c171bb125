"""Coordinator load: lease -> heartbeat -> complete cycles from concurrent clients on loopback, while
2,000 registered workers heartbeat every 10 s. Prints a table and writes JSON.

A cycle's result is 256 bytes, uploaded as workers upload it (CoordinatorClient.complete): in one
CompleteInline call; `--stream` uses the Complete stream (a header message, then a data message).

    python benchmarks/coordinator_load.py                                   # SQLite in a temp dir
    python benchmarks/coordinator_load.py --db postgresql+psycopg://postgres@127.0.0.1:5432/bench
    python benchmarks/coordinator_load.py --json runs/bench/coordinator.json --duration 30

The server is the real `mujina-coordinator serve` in its own process; clients use grpc.aio in
`--procs` processes (so client work does not share the server's interpreter). The idle workers belong
to tokens of 50 workers each (a token may have limits.max_workers_per_token live workers), the cycling
clients to one more token. JSON keys: cycles_per_s, p99_heartbeat_ms (all heartbeats: idle workers'
and cycling clients'), p50_heartbeat_ms, p99_cycle_ms, server_rss_mb (peak), plus the settings.
Nothing here is pass/fail.

`--flood MODE[,MODE...]` (or `--flood all`) runs the same load once per mode while one more token,
in a process of its own, floods one limit as fast as it can with 8 concurrent calls: `none` (no
flood, the baseline), `kinds` (Lease with ~1 MiB of distinct kinds), `heartbeat` (Heartbeats of ~4 MiB,
80,000 entries), `fail` (Lease + Fail(ERROR) in a loop), `uploads` (six concurrent 24 MiB Complete
streams on one lease, again and again), `register` (Register with the largest capabilities allowed,
again and again). The flooder runs at nice 19, so that on a small machine it takes the CPU the
server and the honest clients leave rather than starving them (a remote flooder's CPU is its own). A
stream refused before it was read may reach the aio client as INTERNAL ("Internal error from Core")
rather than its status. Each mode's row gives the honest workers' heartbeat latency, their cycles/s, the
server's peak RSS, and what the flooder's calls got. `--repo DIR` runs the server from another
checkout (e.g. a `git worktree` of the code before a change), so before and after are measured by
the same load.

    python benchmarks/coordinator_load.py --flood all --duration 15 --json runs/bench/flood.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "mj_benchmark_token"          # the cycling clients'
IDLE_TOKEN = "mj_benchmark_idle_{}"    # the idle workers', 50 workers each
FLOOD_TOKEN = "mj_benchmark_flooder"   # the flooder's (the project's default limits)
IDLE_PER_TOKEN = 50
FLOODS = ("none", "kinds", "heartbeat", "fail", "uploads", "register")
FLOOD_CONCURRENCY = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(db: str, project: Path, n_tasks: int, n_idle: int) -> None:
    from sqlalchemy import insert

    from coordinator import store as S

    store = S.Store.open(db)
    store.add_token("bench", TOKEN, max_leases=1_000_000)
    for i in range(-(-n_idle // IDLE_PER_TOKEN)):
        store.add_token(f"idle{i}", IDLE_TOKEN.format(i))
    store.add_token("flooder", FLOOD_TOKEN)
    now = time.time()
    payload = json.dumps({"checkpoint": "c", "shard": "s", "shard_tokens": 4096})
    rows = [dict(id=uuid.uuid4().hex, kind="eval", run="bench", priority=0, state="pending", payload=payload,
                 min_gpu_memory=0, needs_cuda=False, min_speed=0.0, attempts=0, max_attempts=3, created=now + i * 1e-6,
                 updated=now) for i in range(n_tasks)]
    with store.tx() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(insert(S.tasks), rows[i:i + 5000])
    store.close()


async def _cyclers(target: str, n: int, duration: float, stream: bool, out: dict):
    import grpc

    from coordinator.api import mujina_pb2 as pb
    from coordinator.api import mujina_pb2_grpc as pb_grpc

    md = (("authorization", f"Bearer {TOKEN}"),)
    data = b"r" * 256
    digest = hashlib.sha256(data).hexdigest()
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        end = time.monotonic() + duration

        async def one():
            wid = (await stub.Register(pb.RegisterRequest(name="cycler", capabilities=pb.Capabilities(speed=1.0)),
                                       metadata=md)).worker_id
            while time.monotonic() < end:
                try:
                    await cycle(wid)
                except grpc.RpcError as err:  # refused (e.g. the server busy): counted, and the cycle is lost
                    out["cycle_errors"][err.code().name] += 1

        async def cycle(wid):
            t0 = time.perf_counter()
            r = await stub.Lease(pb.LeaseRequest(worker_id=wid, kinds=["eval"]), metadata=md)
            if not r.HasField("task"):
                out["no_work"] += 1
                await asyncio.sleep(0.1)
                return
            h0 = time.perf_counter()
            await stub.Heartbeat(pb.HeartbeatRequest(worker_id=wid, leases=[
                pb.LeaseProgress(lease_id=r.task.lease_id, progress=0.5)]), metadata=md)
            out["hb_ms"].append((time.perf_counter() - h0) * 1e3)

            head = pb.CompleteHeader(task_id=r.task.task_id, lease_id=r.task.lease_id, size_bytes=len(data),
                                     sha256=digest, metrics={"loss": 2.0, "tokens": 1024})
            if stream:
                await stub.Complete(iter([pb.CompleteChunk(header=head), pb.CompleteChunk(data=data)]),
                                    metadata=md)
            else:  # what CoordinatorClient.complete sends for a result this small
                await stub.CompleteInline(pb.CompleteInlineRequest(header=head, data=data), metadata=md)
            out["cycle_ms"].append((time.perf_counter() - t0) * 1e3)
            out["cycles"] += 1

        await asyncio.gather(*(one() for _ in range(n)))


async def _idle(target: str, n: int, interval: float, duration: float, out: dict, ready):
    import grpc

    from coordinator.api import mujina_pb2 as pb
    from coordinator.api import mujina_pb2_grpc as pb_grpc

    mds = [(("authorization", f"Bearer {IDLE_TOKEN.format(j // IDLE_PER_TOKEN)}"),) for j in range(n)]
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        ids = []
        for i in range(0, n, 100):  # register in batches of 100 concurrent calls
            rs = await asyncio.gather(*(stub.Register(pb.RegisterRequest(
                name=f"idle{j}", capabilities=pb.Capabilities(speed=1.0)), metadata=mds[j])
                for j in range(i, min(n, i + 100))))
            ids += [(r.worker_id, mds[j]) for j, r in zip(range(i, min(n, i + 100)), rs, strict=True)]
        out["registered"] = len(ids)
        ready.set()  # the cycling clients start now; idle heartbeats run until they are done
        end = time.monotonic() + duration

        async def beat(wid, md):
            await asyncio.sleep(random.uniform(0, interval))  # spread the phases evenly
            while time.monotonic() < end:
                h0 = time.perf_counter()
                try:
                    await stub.Heartbeat(pb.HeartbeatRequest(worker_id=wid), metadata=md)
                except grpc.RpcError as err:  # refused (e.g. the server busy): counted, and as slow as it was
                    out["hb_errors"][err.code().name] += 1
                out["hb_ms"].append((time.perf_counter() - h0) * 1e3)
                await asyncio.sleep(interval)

        await asyncio.gather(*(beat(w, md) for w, md in ids))


async def _flood(target: str, mode: str, duration: float, out: dict, ready):
    """One token flooding one limit (FLOODS) with FLOOD_CONCURRENCY calls at a time until `duration` ends."""
    import grpc

    from coordinator.api import mujina_pb2 as pb
    from coordinator.api import mujina_pb2_grpc as pb_grpc

    md = (("authorization", f"Bearer {FLOOD_TOKEN}"),)
    got = out["flood"]
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        wid = (await stub.Register(pb.RegisterRequest(name="flooder", capabilities=pb.Capabilities(speed=1.0)),
                                   metadata=md)).worker_id
        rnd = random.Random(0)
        if mode == "kinds":     # ~1 MiB of distinct kinds per call
            request = pb.LeaseRequest(worker_id=wid, kinds=[f"{rnd.getrandbits(64):016x}" for _ in range(60_000)])
        elif mode == "heartbeat":   # just under the default 4 MiB message limit
            request = pb.HeartbeatRequest(worker_id=wid, leases=[
                pb.LeaseProgress(lease_id=f"{rnd.getrandbits(128):032x}", progress=0.5) for _ in range(80_000)])
        elif mode == "register":    # the largest description Register accepts
            request = pb.RegisterRequest(name="r" * 256, capabilities=pb.Capabilities(
                speed=1.0, devices=[pb.Device(kind="cuda", name="g" * 256, memory_bytes=1 << 34)] * 64,
                software={f"{i:064d}": "v" * 256 for i in range(64)}))
        upload = b"u" * (24 << 20)
        ready.wait()
        end = time.monotonic() + duration

        async def call(rpc, req):
            try:
                r = await rpc(req, metadata=md)
                got["OK"] += 1
                return r
            except grpc.RpcError as err:
                got[err.code().name] += 1
                return None

        async def upload_once(task):   # a 24 MiB stream whose digest is wrong: DATA_LOSS at its end
            def chunks():
                yield pb.CompleteChunk(header=pb.CompleteHeader(task_id=task.task_id, lease_id=task.lease_id,
                                                                size_bytes=len(upload), sha256="0" * 64))
                for i in range(0, len(upload), 1 << 20):
                    yield pb.CompleteChunk(data=upload[i:i + (1 << 20)])
            await call(stub.Complete, chunks())

        async def one():
            while time.monotonic() < end:
                if mode == "fail":
                    r = await call(stub.Lease, pb.LeaseRequest(worker_id=wid, kinds=["eval"]))
                    if r is not None and r.HasField("task"):
                        await call(stub.Fail, pb.FailRequest(task_id=r.task.task_id, lease_id=r.task.lease_id,
                                                             reason=pb.ERROR, message="flood"))
                    elif r is not None:
                        got["no_work"] += 1
                elif mode == "uploads":
                    r = await call(stub.Lease, pb.LeaseRequest(worker_id=wid, kinds=["eval"]))
                    if r is None or not r.HasField("task"):
                        await asyncio.sleep(0.1)
                        continue
                    while time.monotonic() < end:
                        await asyncio.gather(*(upload_once(r.task) for _ in range(6)))
                else:
                    rpc = {"kinds": stub.Lease, "heartbeat": stub.Heartbeat, "register": stub.Register}[mode]
                    await call(rpc, request)

        await asyncio.gather(*(one() for _ in range(1 if mode == "uploads" else FLOOD_CONCURRENCY)))


def _proc(kind: str, target: str, args: dict, ready, q: mp.Queue):
    out = {"cycles": 0, "no_work": 0, "hb_ms": [], "cycle_ms": [], "hb_errors": collections.Counter(),
           "cycle_errors": collections.Counter(), "flood": collections.Counter()}
    if kind == "idle":
        coro = _idle(target, args["workers"], args["interval"], args["duration"] + 2.0, out, ready)
    elif kind == "flood":
        # nice 19: the flooder's own CPU is the attacker's, not the server's; on a small machine it takes what
        # the honest clients and the server leave (its calls/s are reported)
        os.nice(19)
        coro = _flood(target, args["flood"], args["duration"], out, ready)
    else:
        ready.wait()
        out["cpu0_s"] = time.process_time()  # after imports and start-up: only the cycling is counted
        coro = _cyclers(target, args["clients"], args["duration"], args["stream"], out)
    asyncio.run(coro)
    out["cpu_s"] = time.process_time() - out.get("cpu0_s", 0.0)
    q.put(out)


def _rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text().split("\n")
    val = {line.split(":")[0]: line.split()[1] for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return int(val["VmRSS"]) / 1024, int(val["VmHWM"]) / 1024


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", help="store URL (default: SQLite in a temporary state directory)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--clients", type=int, default=16, help="concurrent cycling clients per process")
    ap.add_argument("--procs", type=int, default=1, help="client processes doing cycles")
    ap.add_argument("--workers", type=int, default=2000, help="registered idle workers heartbeating")
    ap.add_argument("--interval", type=float, default=10.0, help="idle workers' heartbeat interval, seconds")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds of cycling")
    ap.add_argument("--stream", action="store_true",
                    help="upload results with the Complete stream (header, then data) instead of one CompleteInline "
                         "call, which is what workers send for results up to 1 MiB")
    ap.add_argument("--flood", help=f"one run per mode while one token floods a limit: {', '.join(FLOODS)} "
                                    "(comma-separated) or all")
    ap.add_argument("--repo", type=Path, default=REPO, help="run the server from this checkout (default: this one)")
    args = ap.parse_args(argv)
    if args.db and args.flood:
        ap.error("--flood runs the load once per mode, each on a fresh store: leave out --db")
    modes = [None] if args.flood is None else list(FLOODS) if args.flood == "all" else args.flood.split(",")
    unknown = [m for m in modes if m is not None and m not in FLOODS]
    if unknown:
        ap.error(f"--flood: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(FLOODS)} or all")
    results = [_run(args, mode) for mode in modes]
    if args.flood is None:
        _print_one(args, results[0])
    else:
        _print_floods(args, results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results[0] if args.flood is None else results, indent=2) + "\n")
    return 0


def _run(args, flood: str | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mujina-bench-"))
    project = tmp / "project.yaml"
    # With --flood the project's default limits stand (the flooder's token has them); the cycling clients'
    # token may hold any number of leases either way.
    leases = "" if flood else "limits: {max_leases_per_token: 1000000}\n"
    project.write_text(f"run: bench\nstate_dir: state\nleases: {{duration_s: 120, heartbeat_interval_s: 10}}\n{leases}")
    db = args.db or f"sqlite:///{tmp / 'state' / 'coordinator.db'}"
    n_tasks = int(args.clients * args.procs * args.duration * 100) + 1000  # more than can be done (~45/s a client)
    _prepare(db, project, n_tasks, args.workers)
    port = _free_port()
    target = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(project), "--db", db,
                               "--listen", target], cwd=args.repo, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "serve.log", "wb"))
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(target) as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        settings = dict(workers=args.workers, interval=args.interval, duration=args.duration, clients=args.clients,
                        stream=args.stream, flood=flood)
        ready = ctx.Event()  # set once the idle workers are registered
        procs = [ctx.Process(target=_proc, args=("idle", target, settings, ready, q))]
        procs += [ctx.Process(target=_proc, args=("cycle", target, settings, ready, q)) for _ in range(args.procs)]
        if flood not in (None, "none"):
            procs.append(ctx.Process(target=_proc, args=("flood", target, settings, ready, q)))
        for p in procs:
            p.start()
        ready.wait(timeout=600)
        rss0 = _rss_mb(server.pid)[0]
        cpu0, t0, load0 = _cpu_s(server.pid), time.monotonic(), os.getloadavg()[0]
        time.sleep(args.duration)  # the cycling clients' measured window
        server_cpu, wall = _cpu_s(server.pid) - cpu0, time.monotonic() - t0
        outs = [q.get(timeout=args.duration + 900) for _ in procs]
        for p in procs:
            p.join()
        rss, peak = _rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    cycles = sum(o["cycles"] for o in outs)
    hb = [x for o in outs for x in o["hb_ms"]]
    idle = next(o for o in outs if "registered" in o)
    cyc = [x for o in outs for x in o["cycle_ms"]]
    flooded = sum((o["flood"] for o in outs), collections.Counter())
    return {
        "db": "postgresql" if db.startswith("postgresql") else "sqlite",
        "flood": flood,
        "repo": str(args.repo),
        "cycles_per_s": cycles / args.duration,
        "p99_heartbeat_ms": _pct(hb, 99), "p50_heartbeat_ms": _pct(hb, 50),
        "p99_idle_heartbeat_ms": _pct(idle["hb_ms"], 99), "heartbeats": len(hb),
        "heartbeat_errors": dict(idle["hb_errors"]),
        "cycle_errors": dict(sum((o["cycle_errors"] for o in outs), collections.Counter())),
        "p50_cycle_ms": _pct(cyc, 50), "p99_cycle_ms": _pct(cyc, 99),
        "server_rss_mb": rss, "server_peak_rss_mb": peak, "server_rss_at_start_mb": rss0,
        "flood_calls": dict(flooded), "flood_calls_per_s": sum(flooded.values()) / args.duration,
        "clients": args.clients * args.procs, "idle_workers": args.workers, "duration_s": args.duration,
        "upload": "Complete stream" if args.stream else "CompleteInline",
        "cpus": os.cpu_count(),
        "no_work_answers": sum(o["no_work"] for o in outs),
        # CPU per cycle: robust to other jobs on the machine (wall-clock figures are not).
        "server_cpu_ms_per_cycle": server_cpu * 1e3 / max(cycles, 1),
        "server_cpu_cores": server_cpu / wall,
        "cycler_cpu_ms_per_cycle": sum(o["cpu_s"] for o in outs if "registered" not in o and not o["flood"])
        * 1e3 / max(cycles, 1),
        "load_average_1m": load0,
    }


def _print_one(args, res: dict) -> None:
    print(f"coordinator load ({res['db']}, {res['clients']} cycling clients uploading with {res['upload']}, "
          f"{args.workers} idle workers heartbeating every {args.interval:g} s, {args.duration:g} s, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'metric':<26}{'value':>12}")
    for key in ("cycles_per_s", "p50_heartbeat_ms", "p99_heartbeat_ms", "p99_idle_heartbeat_ms", "p50_cycle_ms",
                "p99_cycle_ms", "server_rss_mb", "server_peak_rss_mb", "server_cpu_ms_per_cycle", "server_cpu_cores",
                "cycler_cpu_ms_per_cycle", "load_average_1m"):
        print(f"{key:<26}{res[key]:>12.1f}")


def _print_floods(args, results: list[dict]) -> None:
    r0 = results[0]
    print(f"coordinator load under a flood ({r0['db']}, server from {args.repo}, {r0['clients']} cycling clients, "
          f"{args.workers} idle workers heartbeating every {args.interval:g} s, {args.duration:g} s per mode, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'flood':<10}{'cycles/s':>9}{'p50 hb ms':>10}{'p99 hb ms':>10}{'p99 idle':>9}{'hb errs':>8}"
          f"{'RSS MB':>8}{'peak MB':>8}{'flood/s':>8}  flood calls got")
    for r in results:
        got = ", ".join(f"{k} {v}" for k, v in sorted(r["flood_calls"].items(), key=lambda kv: -kv[1]))
        print(f"{r['flood'] or 'none':<10}{r['cycles_per_s']:>9.1f}{r['p50_heartbeat_ms']:>10.1f}"
              f"{r['p99_heartbeat_ms']:>10.1f}{r['p99_idle_heartbeat_ms']:>9.1f}"
              f"{sum(r['heartbeat_errors'].values()):>8d}{r['server_rss_mb']:>8.1f}{r['server_peak_rss_mb']:>8.1f}"
              f"{r['flood_calls_per_s']:>8.1f}  {got or '-'}")


if __name__ == "__main__":
    sys.exit(main())

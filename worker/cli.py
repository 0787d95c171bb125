"""`mujina-worker`: the volunteer's command.

    mujina-worker run --coordinator HOST:PORT --token TOKEN [--config worker.toml] [--devices cuda:0,...]
                      [--max-gpu-memory 12GiB] [--active-hours 22:00-07:00] [--kinds generate,judge,eval]
                      [--cache-dir DIR] [--max-disk 50GiB] [--metrics-port P [--metrics-host 127.0.0.1]]
                      [--teacher NAME=DIR ...] [--allow-local-paths DIR ...] [--once | --max-tasks N] [--no-benchmark]
    mujina-worker doctor [--coordinator HOST:PORT --token TOKEN] [--config worker.toml] [--teacher NAME=DIR ...]
                         [--devices ...] [--json]

Exit codes: 0 ok (doctor: at least one task kind can run), 1 doctor found nothing to run,
2 a user error (the message says what to fix), or `run` found no task kind this machine can run
(a teacher missing or without a chat template, a package not installed: the log says which), 130 aborted
by a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

log = logging.getLogger("worker")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mujina-worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="lease and run tasks until SIGTERM")
    r.add_argument("--coordinator", help="HOST:PORT of the coordinator")
    r.add_argument("--token", help="your volunteer token (from the organizer)")
    r.add_argument("--config", type=Path, help="worker.toml with the same keys as these options")
    r.add_argument("--name", help="a label for the organizer (default: host name)")
    r.add_argument("--devices", help="comma-separated torch devices, e.g. cuda:0 (default: the first found)")
    r.add_argument("--max-gpu-memory", help="memory a task may use on the device, e.g. 12GiB")
    r.add_argument("--active-hours", help="local time window to work in, e.g. 22:00-07:00")
    r.add_argument("--kinds", help="task kinds to run, among generate, judge, eval, train (default: "
                   "generate,judge,eval)")
    r.add_argument("--cache-dir", help="shards, checkpoints, spooled results (default ~/.cache/mujina)")
    r.add_argument("--max-disk", help="cap of the download cache, e.g. 50GiB")
    r.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    r.add_argument("--metrics-host", help="address the metrics port listens on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface)")
    r.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR",
                   help="where the teacher model NAME lives on this machine (a Hugging Face directory)")
    r.add_argument("--allow-local-paths", action="append", default=[], metavar="DIR",
                   help="let tasks name local files under DIR (a teacher's path); by default a task may name "
                   "none: teachers come from --teacher")
    r.add_argument("--max-tasks", type=int, help="stop after this many tasks")
    r.add_argument("--once", action="store_true", help="run one task, then stop (same as --max-tasks 1)")
    r.add_argument("--no-benchmark", action="store_true", help="skip the speed benchmark (speed 0 is reported)")
    _transport_flags(r)
    d = sub.add_parser("doctor", help="check devices, memory, speed and the coordinator")
    d.add_argument("--coordinator", help="HOST:PORT to check reachability and the token against")
    d.add_argument("--token")
    d.add_argument("--devices", help="comma-separated torch devices to check")
    d.add_argument("--kinds", help="task kinds to check (default: all)")
    d.add_argument("--config", type=Path, help="worker.toml whose [teachers] to check")
    d.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR",
                   help="a teacher model to check (directory, config, tokenizer, chat template)")
    d.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mujina",
                   help="where the benchmark result is cached")
    d.add_argument("--no-benchmark", action="store_true", help="skip the speed benchmark")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    _transport_flags(d)
    return ap


def _transport_flags(p) -> None:
    p.add_argument("--tls", action="store_true", default=None,
                   help="talk to the coordinator over TLS (needed for any address but this machine's)")
    p.add_argument("--ca-cert", type=Path, help="certificate to trust for the coordinator (implies --tls; for a "
                   "self-signed or private-CA certificate the organizer hands out)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow plaintext to a non-loopback coordinator: anyone on the path can read your token")


def _teachers(items: list[str]) -> dict[str, str]:
    teachers = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--teacher {item!r}: write NAME=DIR")
        teachers[name] = path
    return teachers


def cmd_run(args) -> int:
    from .daemon import Daemon, WorkerConfig

    teachers = _teachers(args.teacher)
    cfg = WorkerConfig.load(args.config, coordinator=args.coordinator, token=args.token, name=args.name,
                            devices=args.devices, max_gpu_memory=args.max_gpu_memory,
                            active_hours=args.active_hours, kinds=args.kinds, cache_dir=args.cache_dir,
                            max_disk=args.max_disk, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                            max_tasks=1 if args.once else args.max_tasks, teachers=teachers or None,
                            benchmark=False if args.no_benchmark else None, tls=args.tls, ca_cert=args.ca_cert,
                            insecure=args.insecure, allow_local_paths=args.allow_local_paths or None)
    daemon = Daemon(cfg)
    interrupts, daemon_pid = [], os.getpid()

    def on_signal(signum, _frame):
        if os.getpid() != daemon_pid:
            # A fork()ed child (hivemind's DHT process) inherits this handler but has no daemon
            # to stop: a SIGTERM sent to the whole process group (systemd, `kill -- -PGID`) ends it as it ends
            # any process, else the daemon would wait for it forever at exit; a SIGINT (a terminal's Ctrl-C) is
            # ignored, as hivemind's own handlers do, and the daemon shuts its children down in order.
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            interrupts.append(signum)
            if len(interrupts) > 1:
                raise KeyboardInterrupt("second SIGINT")
        daemon.request_stop(name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `kill -USR1 PID` writes every thread's stack to stderr, from C: it works when the main thread is stuck
    # and could not run the Python handler above (the demo sends it before a SIGKILL)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return daemon.run()
    except KeyboardInterrupt:
        log.warning("aborted by a second SIGINT; the current lease expires on its own")
        return 130


def cmd_doctor(args) -> int:
    from .hardware import doctor, format_report

    if args.coordinator:
        from .transport import check_address, check_transport

        check_address(args.coordinator)
        check_transport(args.coordinator, bool(args.tls), args.ca_cert, bool(args.insecure))
    teachers: dict[str, str] = {}
    if args.config is not None:
        import tomllib

        try:
            teachers = dict(tomllib.loads(args.config.read_text()).get("teachers", {}))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"--config {args.config}: {e}") from None
    teachers.update(_teachers(args.teacher))
    report = doctor(args.cache_dir, devices=args.devices.split(",") if args.devices else None,
                    coordinator=args.coordinator, token=args.token, tls=bool(args.tls), ca_cert=args.ca_cert,
                    kinds=args.kinds.split(",") if args.kinds else None, bench=not args.no_benchmark,
                    teachers={k: Path(v).expanduser() for k, v in teachers.items()})
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return {"run": cmd_run, "doctor": cmd_doctor}[args.cmd](args)
    except ValueError as e:
        print(f"mujina-worker: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:  # a refusal that no retry can fix, e.g. UNAUTHENTICATED
        print(f"mujina-worker: the coordinator refused: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

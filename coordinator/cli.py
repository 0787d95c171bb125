"""`mujina-coordinator`: the organizer's command.

    mujina-coordinator serve  --config project.yaml [--db URL] [--listen HOST:PORT] [--metrics-port P]
                              [--http-port P] [--tls-cert PEM --tls-key PEM]
    mujina-coordinator token  add NAME [--max-leases N] | list | revoke NAME
    mujina-coordinator tasks  add --kind eval --payload JSON [--count N] [--priority P] [--min-gpu-memory B]
                              [--needs-cuda] [--min-speed S] | list [--state S]
    mujina-coordinator tasks  cancel|retry [TASK_ID ...] [--state S] [--kind K] [--all]
    mujina-coordinator plan   (synthetic data: generate/judge tasks from the project's `synthetic` section;
                               retires pending tasks planned with a teacher whose files changed since)
    mujina-coordinator status
    mujina-coordinator init-swarm --checkpoint UPCYCLED_MOE   (needs a `swarm:` section; `serve` runs the rounds)
    mujina-coordinator ledger [--csv]

Every subcommand takes the same --config and --db as `serve`. Exit codes: 0 ok, 2 a user error
(the message says what to fix).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger("coordinator")


def _common(p: argparse.ArgumentParser):
    p.add_argument("--config", required=True, type=Path, help="the project file (see configs/project.yaml)")
    p.add_argument("--db", help="SQLAlchemy URL of the store; default: the project's db, else SQLite in state_dir")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mujina-coordinator", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the gRPC service until SIGTERM/SIGINT")
    _common(s)
    s.add_argument("--listen", help="HOST:PORT (default: server.listen of the project file); port 0 picks one")
    s.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    s.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default: "
                   "127.0.0.1, this machine only; 0.0.0.0 lets Prometheus on other machines scrape it)")
    s.add_argument("--http-port", type=int, help="serve the live status page (and /api/status) on this port "
                   "(default: off)")
    s.add_argument("--http-host", default="127.0.0.1", help="address of the status page (default: 127.0.0.1, "
                   "this machine only; 0.0.0.0 shows it to everyone who can reach this machine)")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: serve TLS)")
    s.add_argument("--tls-key", type=Path, help="PEM private key")
    s.add_argument("--port-file", type=Path, help="write the bound gRPC port here once serving (for scripts)")

    t = sub.add_parser("token", help="volunteer tokens (stored hashed)")
    tsub = t.add_subparsers(dest="action", required=True)
    ta = tsub.add_parser("add", help="create a token; it is printed once, on the last line")
    _common(ta)
    ta.add_argument("name")
    ta.add_argument("--max-leases", type=int, help="concurrent leases for this token (default: the project's)")
    tl = tsub.add_parser("list", help="list tokens (names, never the tokens)")
    _common(tl)
    tr = tsub.add_parser("revoke", help="revoke a token (takes effect within seconds on a running server)")
    _common(tr)
    tr.add_argument("name")

    k = sub.add_parser("tasks", help="add, list, cancel and retry tasks")
    ksub = k.add_subparsers(dest="action", required=True)
    ka = ksub.add_parser("add", help="add tasks; prints one task id per line")
    _common(ka)
    ka.add_argument("--kind", required=True, help="task kind, e.g. eval")
    ka.add_argument("--payload", required=True, help="JSON object of the kind's parameters")
    ka.add_argument("--count", type=int, default=1, help="add this many identical tasks")
    ka.add_argument("--priority", type=int, default=0, help="higher is leased first")
    ka.add_argument("--min-gpu-memory", type=int, default=0, help="bytes of accelerator memory needed")
    ka.add_argument("--needs-cuda", action="store_true", help="only CUDA workers may run it")
    ka.add_argument("--min-speed", type=float, default=0.0, help="minimum measured worker speed (tokens/s)")
    ka.add_argument("--max-attempts", type=int, help="default: leases.max_attempts of the project")
    kl = ksub.add_parser("list", help="list tasks")
    _common(kl)
    kl.add_argument("--state", choices=["pending", "leased", "done", "dead"])
    kl.add_argument("--json", action="store_true", help="one JSON object per line")
    kc = ksub.add_parser("cancel", help="end tasks that are not done yet (they go dead, without credit; a worker "
                         "holding one is told to stop); prints how many changed")
    kr = ksub.add_parser("retry", help="send dead tasks back to the queue (attempts reset, open to every token "
                         "again); prints how many changed")
    for p, states, default in ((kc, ("pending", "leased"), "pending and leased"), (kr, ("dead", "pending"), "dead")):
        _common(p)
        p.add_argument("task_ids", nargs="*", metavar="TASK_ID", help="these tasks (`tasks list` shows ids)")
        p.add_argument("--state", choices=states, help=f"only tasks in this state (default: {default})")
        p.add_argument("--kind", help="only tasks of this kind, e.g. generate")
        p.add_argument("--all", action="store_true", help="every task of the run in the selected state(s)")

    pl = sub.add_parser("plan", help="synthetic data: add generate and judge tasks (idempotent), shard results")
    _common(pl)
    sw = sub.add_parser("init-swarm", help="start swarm training of an upcycled MoE checkpoint (round 0)")
    _common(sw)
    sw.add_argument("--checkpoint", required=True, type=Path, help="the upcycled MoE (mujina-model upcycle)")

    st = sub.add_parser("status", help="a readable summary of tasks, leases, workers and credit")
    _common(st)
    lg = sub.add_parser("ledger", help="validated contributions per volunteer, kind and unit")
    _common(lg)
    lg.add_argument("--csv", action="store_true", help="CSV instead of a table")
    return ap


def load_project_file(path: Path):
    """load_project, with a YAML syntax error told as the file and line to fix (yaml's own message names
    neither the file nor how to go on)."""
    import yaml

    from .config import load_project

    try:
        return load_project(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}); fix that line (configs/project.yaml shows the "
                         "format)") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path} is a directory; give the project file, e.g. "
                         f"{path}/project.yaml") from None


def _open(args):
    from .store import Store

    cfg = load_project_file(args.config)
    return cfg, Store.open(args.db or cfg.db_url())


def check_ports_free(binds: list[tuple[str, str, str, int]]) -> None:
    """Refuse ports another process listens on, and hosts that are not this machine's, before anything starts,
    naming the flag: [(port flag, host flag, host, port)].
    A bind test with SO_REUSEADDR, as the servers bind, so a port in TIME_WAIT is not mistaken for a taken one;
    a port taken between this check and the real bind still fails there with the servers' own message."""
    import errno
    import socket

    for flag, host_flag, host, port in binds:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host.strip("[]"), port))
            except socket.gaierror:
                raise ValueError(f"{host_flag}: {host!r} is not a host name or address this machine can resolve; use "
                                 "127.0.0.1, 0.0.0.0 or one of its own addresses") from None
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ValueError(f"{flag}: cannot listen on {host}:{port}, the port is in use by another "
                                     f"process; pick another {flag} (port 0 picks a free one), or stop what listens "
                                     f"there (`ss -ltnp 'sport = :{port}'` shows it)") from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise ValueError(f"{host_flag}: {host} is not an address of this machine; use 127.0.0.1, 0.0.0.0 "
                                     "or one of its own addresses") from None
                raise


def cmd_serve(args) -> int:
    from .server import CoordinatorServer

    cfg = load_project_file(args.config)
    for flag, port in (("--metrics-port", args.metrics_port), ("--http-port", args.http_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"{flag} must be a TCP port (0-65535; 0 picks a free one), got {port}")
    listen = args.listen or cfg.server.listen
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:50051; port 0 picks one), got {listen!r}")
    check_ports_free([("--listen", "--listen", host, int(port))]  # (server.listen of the project file without it)
                     + [bind for bind in (("--metrics-port", "--metrics-host", args.metrics_host, args.metrics_port),
                                          ("--http-port", "--http-host", args.http_host, args.http_port))
                        if bind[3] is not None])
    lock = hold_state_dir(Path(cfg.state_dir))  # noqa: F841  (held until this process ends, kill -9 included)
    swarm = None
    if cfg.swarm is not None:  # the bootstrap DHT peer: its addresses go to every worker at Register
        from .swarm_driver import start_bootstrap_dht

        dht, maddrs = start_bootstrap_dht((args.listen or cfg.server.listen).rpartition(":")[0] or "0.0.0.0")
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(
            update={"bootstrap_peers": [*cfg.server.bootstrap_peers, *maddrs]})})
    srv = CoordinatorServer(cfg, db_url=args.db, listen=args.listen, metrics_port=args.metrics_port,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_host=args.metrics_host,
                            http_port=args.http_port, http_host=args.http_host)
    if srv.status_page is not None:  # the swarm's progress and synthetic rejections come from the project
        srv.status_page.project = cfg
    srv.start()
    if cfg.swarm is not None:
        from .swarm_driver import SwarmDriver

        swarm = SwarmDriver(cfg, srv.store, srv.scheduler, joins=srv.joins).start()
    if args.port_file:
        args.port_file.write_text(str(srv.port))
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: draining and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    if swarm is not None:
        swarm.stop()
        dht.shutdown()
    srv.stop(grace=5.0)
    log.info("stopped")
    return 0


STATE_LOCK = "coordinator.lock"   # in the state dir: held (flock) by the one coordinator serving it


def hold_state_dir(state_dir: Path):
    """Take the state dir for this process: an exclusive flock on STATE_DIR/coordinator.lock, which names the
    holder (pid, host, since). The kernel drops it when the process ends, kill -9 included. A second
    coordinator on the same state dir is refused (ValueError naming the holder) instead of serving it too."""
    import fcntl
    import os
    import socket

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_LOCK
    f = open(path, "a+")  # noqa: SIM115  (kept open: the lock lives as long as the file description)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{state_dir} is already served by a coordinator ({holder}); stop it first, or give this "
                         f"one another state_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {_when(time.time())}\n")
    f.flush()
    return f


def cmd_init_swarm(args) -> int:
    from .swarm_driver import init_swarm

    cfg = load_project_file(args.config)
    if cfg.swarm is None:
        raise ValueError(f"{args.config} has no `swarm:` section: add one (see configs/project.yaml)")
    name = init_swarm(cfg.state_dir, cfg.run, args.checkpoint)
    print(f"swarm run {cfg.run!r} starts from checkpoints/{name}; `mujina-coordinator serve` runs the rounds")
    return 0


def cmd_token(args) -> int:
    from . import store as S

    cfg, store = _open(args)
    if args.action == "add":
        if args.max_leases is not None and args.max_leases < 1:
            raise ValueError("--max-leases must be >= 1")
        token = "mj_" + secrets.token_urlsafe(32)
        store.add_token(args.name, token, args.max_leases)
        print(f"token for {args.name} (shown once; only its hash is stored):", file=sys.stderr)
        print(token)
    elif args.action == "list":
        with store.read() as conn:
            rows = conn.execute(select(S.tokens).order_by(S.tokens.c.name)).all()
        print(f"{'name':<24} {'state':<8} {'max_leases':>10}  created")
        for r in rows:
            print(f"{r.name:<24} {'revoked' if r.revoked else 'valid':<8} "
                  f"{r.max_leases or cfg.limits.max_leases_per_token:>10}  {_when(r.created)}")
    else:
        store.revoke_token(args.name)
        print(f"revoked {args.name}")
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z" if t else "-"


def cmd_tasks(args) -> int:
    from . import store as S
    from .scheduler import RequestError, Scheduler

    cfg, store = _open(args)
    sched = Scheduler(store, cfg)
    if args.action == "add":
        try:
            payload = json.loads(args.payload)
        except json.JSONDecodeError as e:
            raise ValueError(f"--payload is not valid JSON ({e}); quote it, e.g. '{{\"shard\": \"a.bin\"}}'") from None
        if not isinstance(payload, dict):
            raise ValueError("--payload must be a JSON object")
        if args.count < 1 or args.min_gpu_memory < 0 or args.min_speed < 0:
            raise ValueError("--count must be >= 1; --min-gpu-memory and --min-speed must be >= 0")
        for _ in range(args.count):
            print(sched.add_task(args.kind, payload, args.priority, args.min_gpu_memory, args.needs_cuda,
                                 args.min_speed, args.max_attempts))
    elif args.action == "list":
        q = select(S.tasks).order_by(S.tasks.c.created)
        if args.state:
            q = q.where(S.tasks.c.state == args.state)
        with store.read() as conn:
            rows = conn.execute(q).all()
        if not args.json:
            print(f"{'task':<32} {'kind':<8} {'state':<8} {'prio':>4} {'tries':>5}  last error")
        for r in rows:
            if args.json:
                print(json.dumps({"id": r.id, "kind": r.kind, "state": r.state, "priority": r.priority,
                                  "attempts": r.attempts, "last_error": r.last_error,
                                  "payload": json.loads(r.payload)}))
            else:
                print(f"{r.id:<32} {r.kind:<8} {r.state:<8} {r.priority:>4} {r.attempts:>5}  {r.last_error or ''}")
    elif args.action == "cancel":
        ids = _select_tasks(args, store, cfg.run, ("pending", "leased"))
        n = sched.cancel_tasks(ids, "cancelled by the organizer (mujina-coordinator tasks cancel)")
        print(f"cancelled {n} task{'s' * (n != 1)}" + (f" ({len(ids) - n} already done or dead)" if len(ids) > n
                                                        else ""))
    else:
        ids = _select_tasks(args, store, cfg.run, ("dead",))
        for tid in ids:
            try:
                sched.retry_task(tid)
            except RequestError as e:  # a task that finished between the selection and now
                raise ValueError(e.message) from None
        print(f"retried {len(ids)} task{'s' * (len(ids) != 1)}: pending again, attempts reset, open to every token")
    return 0


def _select_tasks(args, store, run: str, default_states: tuple[str, ...]) -> list[str]:
    """The ids `tasks cancel|retry` act on: the ids given (each checked to exist, and for retry to be dead or
    pending), or the run's tasks matching --state (default: `default_states`) and --kind, or --all of them."""
    from . import store as S

    by_filter = args.state is not None or args.kind is not None or args.all
    if bool(args.task_ids) == by_filter:
        raise ValueError(f"tasks {args.action}: name the tasks either by id (TASK_ID ...) or by filter (--state S, "
                         "--kind K, --all), not both and not neither; e.g. "
                         f"`tasks {args.action} --state {default_states[0]} --kind generate`")
    c = S.tasks.c
    if args.task_ids:
        with store.read() as conn:
            found = dict(conn.execute(select(c.id, c.state).where(c.id.in_(args.task_ids))).all())
        unknown = [t for t in args.task_ids if t not in found]
        if unknown:
            raise ValueError(f"unknown task id(s) {', '.join(unknown)}; `tasks list` shows them (nothing changed)")
        if args.action == "retry":
            busy = [f"{t} ({found[t]})" for t in args.task_ids if found[t] not in ("dead", "pending")]
            if busy:
                raise ValueError(f"only dead or pending tasks can be retried: {', '.join(busy)} (nothing changed)")
        return list(dict.fromkeys(args.task_ids))
    q = select(c.id).where(c.run == run, c.state.in_((args.state,) if args.state else default_states))
    if args.kind is not None:
        q = q.where(c.kind == args.kind)
    with store.read() as conn:
        ids = list(conn.execute(q.order_by(c.created, c.id)).scalars())
        if not ids and args.kind is not None:
            kinds = sorted(conn.execute(select(c.kind).where(c.run == run).distinct()).scalars())
            print(f"no {args.kind!r} task matches; the run's task kinds are: {', '.join(kinds) or 'none'}",
                  file=sys.stderr)
    return ids


def cmd_status(args) -> int:
    from . import store as S
    from .metrics import ACTIVE_WORKER_WINDOW_S, live_workers
    from .status_page import dead_reasons, swarm_progress, swarm_text, synthetic_stats

    cfg, store = _open(args)
    now = time.time()
    with store.read() as conn:
        by_state = conn.execute(select(S.tasks.c.kind, S.tasks.c.state, func.count())
                                .group_by(S.tasks.c.kind, S.tasks.c.state)).all()
        active_leases = conn.execute(select(func.count()).select_from(S.leases)
                                     .where(S.leases.c.state == "active")).scalar_one()
        workers, live, registered = live_workers(conn, now)
        tokens = conn.execute(select(func.count()).select_from(S.tokens)
                              .where(S.tokens.c.revoked.is_(None))).scalar_one()
        credit = conn.execute(select(S.ledger.c.unit, func.sum(S.ledger.c.amount)).group_by(S.ledger.c.unit)).all()
        dead = dead_reasons(conn)
    print(f"run {cfg.run}  store {store.engine.url.render_as_string(hide_password=True)}")
    states = ("pending", "leased", "done", "dead")
    print(f"tasks: {'kind':<10}" + "".join(f"{s:>9}" for s in states))
    for kind in sorted({k for k, _, _ in by_state}):
        counts = {s: n for k, s, n in by_state if k == kind}
        print(f"       {kind:<10}" + "".join(f"{counts.get(s, 0):>9}" for s in states))
    if not by_state:
        print("       (none; add some with `mujina-coordinator tasks add`)")
    for d in dead:
        print(f"dead {d['kind']}: {d['count']} {d['reason']}  (latest: {d['example'][:100]})")
    print(f"leases active: {active_leases}")
    print(f"workers: {live} active in the last {ACTIVE_WORKER_WINDOW_S:.0f} s, {registered} registered; "
          f"{tokens} valid tokens")
    for w in workers:
        if w.last_seen > now - ACTIVE_WORKER_WINDOW_S:
            print(f"  worker {w.name} ({w.token}): seen {now - w.last_seen:.0f} s ago, speed {w.speed:g}, "
                  f"{'cuda' if w.cuda else 'cpu'} {w.gpu_memory / 2**30:.1f} GiB")
    print("credit: " + (", ".join(f"{unit} {exact(amount, grouping=True)}" for unit, amount in credit)
                        or "none yet"))
    swarm = swarm_progress(cfg)
    if swarm is not None:
        print(f"swarm: {swarm_text(swarm)}")
    for kind, s in sorted(synthetic_stats(cfg).items()):
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected"].items())) or "none"
        print(f"synthetic {kind}: {s['accepted']} records accepted, {s['tokens']} tokens; rejected: {rejected}")
    return 0


def cmd_plan(args) -> int:
    from .plan import plan
    from .scheduler import Scheduler

    cfg, store = _open(args)
    def retired(kind: str, teacher: str, old: str, n: int) -> None:
        print(f"retired {n} pending {kind} tasks planned with teacher {teacher}'s old hash {old[:12]} (its files "
              "changed since); their prompts are planned again under the new hash")

    added = plan(cfg, Scheduler(store, cfg), on_retire=retired)
    print(f"prompts {added['prompts']}; added {added['generate']} generate and {added['judge']} judge tasks; "
          f"synthetic shards {added['shards']}")
    return 0


def cmd_ledger(args) -> int:
    from . import store as S

    _, store = _open(args)
    with store.read() as conn:
        rows = conn.execute(select(S.ledger.c.volunteer, S.ledger.c.kind, S.ledger.c.unit,
                                   func.sum(S.ledger.c.amount), func.count())
                            .group_by(S.ledger.c.volunteer, S.ledger.c.kind, S.ledger.c.unit)
                            .order_by(S.ledger.c.volunteer, S.ledger.c.kind, S.ledger.c.unit)).all()
    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["volunteer", "kind", "unit", "amount", "tasks"])
        for vol, kind, unit, amount, n in rows:
            w.writerow([vol, kind, unit, exact(amount), n])
    else:
        print(f"{'volunteer':<24} {'kind':<10} {'unit':<18} {'amount':>18} {'tasks':>7}")
        for vol, kind, unit, amount, n in rows:
            print(f"{vol:<24} {kind:<10} {unit:<18} {exact(amount, grouping=True):>18} {n:>7}")
    return 0


def exact(amount: float, grouping: bool = False) -> str:
    """A credit amount as it is, never rounded: a whole amount in full (with thousands separators for people:
    38,855,593, where `%g` printed 3.88556e+07), any other the shortest decimal that reads back as the same
    float (0.30000000000000004 stays that)."""
    amount = float(amount)
    if amount.is_integer():
        return f"{int(amount):,}" if grouping else str(int(amount))
    return repr(amount)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return {"serve": cmd_serve, "token": cmd_token, "tasks": cmd_tasks, "status": cmd_status,
                "ledger": cmd_ledger, "plan": cmd_plan, "init-swarm": cmd_init_swarm}[args.cmd](args)
    except ValueError as e:  # user errors: the message names the fix
        print(f"mujina-coordinator: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # ours name the port or file and the fix; the system's name a path: say where it came from
        msg = str(e) if e.filename is None else (f"{e.filename}: {e.strerror}; check that path (in {args.config} or "
                                                 "on the command line) and its permissions")
        print(f"mujina-coordinator: {msg}", file=sys.stderr)
        return 2
    except SQLAlchemyError as e:  # a --db / db URL that does not parse, or a database that does not answer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mujina-coordinator: the store could not be opened ({first}); check --db or `db:` in {args.config}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

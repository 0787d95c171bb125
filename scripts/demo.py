"""The whole mujina pipeline on one CPU machine: `make demo` (= python scripts/demo.py).

    python scripts/demo.py [--scale full|tiny] [--out runs/demo] [--ports fixed|auto] [--serve]

Stages (each prints a header, its commands' progress lines and its elapsed time):
   1 corpus       deterministic Japanese/English documents (scripts/demo_corpus.py), no downloads
   2 tokenizer    mujina-data tokenizer train (SentencePiece unigram on MeCab-segmented text)
   3 shards       mujina-data shard: filter, deduplicate, tokenise, write shards + manifest.json
   4 pretrain     the `debug` dense model on the shards under torchrun, 2 processes (FSDP2, gloo)
   5 upcycle      mujina-model upcycle: dense -> 4-expert MoE, exact at step 0
   6 synthetic    export the dense model as the teacher (a Hugging Face Llama + chat template), start a
                  coordinator (status page, metrics) and 3 workers with their own tokens; they generate and
                  judge synthetic data, the coordinator validates it and credits the volunteers
   7 swarm        mujina-coordinator init-swarm on the upcycled MoE; the same 3 workers run DiLoCo rounds
                  (local steps, then each module averaged among its holders over hivemind on loopback)
   8 moe          the swarm's MoE continues on the corpus shards + the accepted synthetic records
   9 posttrain    LoRA SFT on the accepted synthetic chat records, merged, then LoRA DPO on the judge's pairs
                  (the SFT model is DPO's reference; when the tiny teacher's verdicts are unparsable, on pairs
                  constructed from the accepted records: each answer over another prompt's)
  10 results      the leaderboard (mujina-coordinator ledger) and the losses
  11 sample       mujina-model export to Hugging Face (Mixtral, with the chat template), a sample and a chat
                  turn generated with transformers
  12 watch        where the status page is, how to point Prometheus and Grafana at it

Every child runs in its own process group and carries MUJINA_DEMO=OUT in its environment (inherited by
everything it starts: torchrun's ranks, hivemind's DHT processes and p2pd daemons). Ctrl-C (SIGINT) or SIGTERM
stops them all before the demo exits: SIGTERM to each leader, which stops its own children; whatever is still
alive after a grace period (a leader, or a descendant its leader left behind) is named and SIGKILLed, so
nothing outlives the demo. Outputs live under --out; rerunning skips finished
stages and resumes the others (the trainer resumes from its checkpoints, sharding skips finished shards,
the coordinator keeps its SQLite store, `plan` is idempotent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import write_corpus  # noqa: E402

PROMETHEUS_PORTS = {"metrics": 9401, "workers": (9402, 9403, 9404), "train": 9405}  # dashboards/prometheus
STATUS_PORT = 8080
STAGES = 12
PAGE_CACHE_S = 2.5  # /api/status answers from a reading of the store up to 2 s old
STALL_S = 300  # the workers stage gives up when no task changes state for this long


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo run. `full` is what `make demo` runs; `tiny` is the test's."""

    ja_docs: int
    en_docs: int
    vocab: int
    seq_len: int
    pretrain_steps: int
    moe_steps: int
    sft_steps: int
    dpo_steps: int
    prompts: int          # synthetic prompts planned (two answers each)
    max_new_tokens: int
    swarm_rounds: int
    swarm_inner_steps: int
    workers: int = 3


SCALES = {
    "full": Scale(ja_docs=4000, en_docs=1000, vocab=1024, seq_len=256, pretrain_steps=300, moe_steps=100,
                  sft_steps=30, dpo_steps=20,
                  prompts=24, max_new_tokens=64, swarm_rounds=3, swarm_inner_steps=10),
    "tiny": Scale(ja_docs=300, en_docs=60, vocab=1024, seq_len=128, pretrain_steps=30, moe_steps=10,
                  sft_steps=4, dpo_steps=3,
                  prompts=4, max_new_tokens=48, swarm_rounds=1, swarm_inner_steps=3),
}


class Stop(Exception):
    """SIGINT/SIGTERM arrived: unwind and stop every child."""


MARKER = "MUJINA_DEMO"  # environment variable naming the output directory, in every descendant of the demo
HAS_PROC = Path("/proc/self/environ").exists()  # Linux; elsewhere (macOS) leftovers are found by process group only


def marked_processes(value: str) -> dict[int, str]:
    """Live processes (not zombies) whose environment holds MUJINA_DEMO=value: pid -> command line. Linux
    /proc; only this user's processes are readable, which are the only ones the demo can have started."""
    want, found = f"{MARKER}={value}".encode(), {}
    for pid in filter(str.isdigit, os.listdir("/proc") if HAS_PROC else []):
        try:
            if want not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue
            found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


class Children:
    """Every process the demo starts, each the leader of its own process group (so the terminal's Ctrl-C
    reaches only the demo, which then stops them in reverse order: workers before the coordinator)."""

    def __init__(self, logs: Path, marker: str):
        self.logs, self.marker = logs, marker
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.stopping = False  # once set, only the daemons' shutdown lines reach the console (no tracebacks)

    def start(self, name: str, cmd: list[str], quiet: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start `cmd`; its output goes to LOGS/name.log and, prefixed with [name], to the console
        (lines containing any of `quiet` only to the log)."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", MARKER: self.marker,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        with self.lock:
            self.procs.append((name, proc))
        log = open(self.logs / f"{name}.log", "a", encoding="utf-8")
        t = threading.Thread(target=self._pump, args=(name, proc, log, quiet), daemon=True)
        t.start()
        self.threads.append(t)
        return proc

    def _pump(self, name: str, proc: subprocess.Popen, log, quiet: tuple[str, ...]) -> None:
        daemon = name.startswith(("worker", "coordinator"))
        with log:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                log.write(line + "\n")
                log.flush()
                if line and not any(q in line for q in quiet) and (daemon or not self.stopping):
                    print(f"  [{name}] {line}", flush=True)

    def run(self, name: str, cmd: list[str], quiet: tuple[str, ...] = ()) -> None:
        """Run `cmd` to the end in the foreground; a non-zero exit stops the demo with its log's name."""
        proc = self.start(name, cmd, quiet)
        rc = proc.wait()
        self.threads[-1].join(timeout=5)
        if rc != 0:
            raise SystemExit(f"demo: `{' '.join(map(str, cmd[2:]))}` exited {rc}; see {self.logs / name}.log")

    def capture(self, cmd: list[str]) -> str:
        """A short command's stdout (e.g. `token add`, `ledger`), run in its own process group too."""
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, MARKER: self.marker})
        with self.lock:
            self.procs.append((cmd[2], proc))
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"demo: `{' '.join(cmd[2:])}` exited {proc.returncode}: {err.strip()}")
        return out

    def stop(self, procs: list[subprocess.Popen], grace: float = 20.0) -> None:
        """SIGTERM each leader (it stops its own children: torchrun its ranks, a worker its hivemind peers) and
        wait up to `grace` seconds for each group to be empty; SIGKILL what is left, naming it."""
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, t0 + grace - time.monotonic()))
        # A leader's children are in its group; they may still be exiting when it has: give them the grace too.
        while time.monotonic() < t0 + grace and self._members({p.pid for p in procs}):
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                print(f"  pid {p.pid} did not stop within {grace:.0f} s of SIGTERM: SIGKILL", flush=True)
                if "worker.cli" in " ".join(map(str, p.args)):  # its threads' stacks go to its log first
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(1.0)
        self._kill(self._members({p.pid for p in procs}), f"left within {grace:.0f} s of SIGTERM")
        for p in procs:
            if not HAS_PROC:  # no /proc to look in: whatever is left of the group goes, unnamed
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if procs:
            print(f"  {len(procs)} stopped in {time.monotonic() - t0:.1f} s", flush=True)

    def _members(self, groups: set[int]) -> dict[int, str]:
        """Live processes of the demo (MUJINA_DEMO) in the given process groups: pid -> command line."""
        out = {}
        for pid, cmd in marked_processes(self.marker).items():
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) in groups:
                    out[pid] = cmd
        return out

    @staticmethod
    def _kill(procs: dict[int, str], why: str) -> None:
        for pid, cmd in procs.items():
            print(f"  pid {pid} ({cmd[:100]}) {why}: SIGKILL", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        with self.lock:
            live = [(n, p) for n, p in reversed(self.procs) if p.poll() is None]
        self.stopping = True
        if live:
            print(f"\n== stopping {len(live)} child processes: {', '.join(n for n, _ in live)}", flush=True)
        self.stop([p for n, p in live if n.startswith("worker")])  # first: each hands its lease back
        self.stop([p for n, p in live if not n.startswith("worker")])
        # What is left of the demo escaped its leader's group: torch's shared-memory manager (hivemind shares
        # tensors through it) daemonizes and exits by itself a moment after its last client. Anything alive
        # after a few seconds more is a leftover.
        end = time.monotonic() + 5.0
        while (left := marked_processes(self.marker)) and time.monotonic() < end:
            time.sleep(0.2)
        self._kill(left, "outlived its leader")
        for _, p in self.procs if not HAS_PROC else []:  # groups whose leader already exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)


def py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def free_port(preferred: int | None) -> int:
    """`preferred` when nothing listens there, else a free port the system picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port")


def wait_file(path: Path, proc: subprocess.Popen, what: str, limit: float = 120.0) -> None:
    end = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited {proc.returncode} before it was ready")
        if time.monotonic() > end:
            raise SystemExit(f"demo: {what} not ready after {limit:.0f} s")
        time.sleep(0.2)


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def last_metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.scale = SCALES[args.scale]
        self.scale_name = args.scale
        self.out = Path(args.out).resolve()
        self.fixed_ports = args.ports == "fixed"
        self.serve = args.serve
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.children = Children(self.out / "logs", str(self.out))
        self.t0 = time.monotonic()
        self.timings: list[tuple[str, float, str]] = []
        self.coordinator: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.worker_ports: list[int] = []

    # ---- helpers ---------------------------------------------------------------------------------

    def stage(self, n: int, title: str, done: bool, fn) -> None:
        print(f"\n== {n}/{STAGES} {title}" + ("  (done before: skipped)" if done else ""), flush=True)
        start = time.monotonic()
        if not done:
            fn()
        took = time.monotonic() - start
        self.timings.append((title, took, "skipped" if done else "ran"))
        print(f"   -- {took:.1f} s (total {time.monotonic() - self.t0:.0f} s)", flush=True)

    def port(self, preferred: int) -> int:
        return free_port(preferred if self.fixed_ports else None)

    @property
    def project(self) -> Path:
        return self.out / "project.yaml"

    def coord_cli(self, *args: str) -> list[str]:
        return py("coordinator.cli", *args, "--config", str(self.project))

    # ---- stages ----------------------------------------------------------------------------------

    def corpus(self) -> None:
        files = write_corpus(self.out / "corpus", self.scale.ja_docs, self.scale.en_docs, seed=0)
        for name, path in files.items():
            n = sum(1 for _ in path.open(encoding="utf-8"))
            print(f"  {path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {n} documents ({name})")

    def tokenizer(self) -> None:
        c = self.out / "corpus"
        self.children.run("tokenizer", py("data_shards.cli", "tokenizer", "train", "--input", str(c / "ja.jsonl"),
                                          str(c / "en.jsonl"), "--vocab-size", str(self.scale.vocab),
                                          "--out", str(self.out / "tokenizer"), "--threads", "2"),
                          quiet=("LOG(INFO)",))

    def shards(self) -> None:
        c = self.out / "corpus"
        for split, inputs in (("train", [c / "ja.jsonl", c / "en.jsonl"]), ("eval", [c / "eval.jsonl"])):
            self.children.run(f"shard-{split}", py("data_shards.cli", "shard", "--input", *map(str, inputs),
                                                   "--tokenizer", str(self.out / "tokenizer"),
                                                   "--out", str(self.out / "shards" / split), "--workers", "2"))

    def pretrain(self) -> None:
        s = self.scale
        vocab = json.loads((self.out / "tokenizer" / "mujina_tokenizer.json").read_text())["vocab_size"]
        cfg = {
            "model": {"preset": "debug", "vocab_size": vocab, "max_seq_len": 1024},  # judge prompts hold two answers
            "out": str(self.out / "dense"),
            "data": {"source": "shards", "seq_len": s.seq_len,
                     "mixture": [{"path": str(self.out / "shards" / "train"), "weight": 1.0}],
                     "eval_mixture": [{"path": str(self.out / "shards" / "eval"), "weight": 1.0}]},
            "optim": {"lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": max(1, s.pretrain_steps // 10)},
            "train": {"steps": s.pretrain_steps, "batch_size": 16, "micro_batch_size": 4, "seed": 0,
                      "log_every": max(1, s.pretrain_steps // 12), "eval_every": max(1, s.pretrain_steps // 3),
                      "eval_batches": 2, "save_every": max(1, s.pretrain_steps // 3),
                      "metrics_port": self.port(PROMETHEUS_PORTS["train"])},
        }
        config = write_yaml(self.out / "dense.yaml", cfg)
        print(f"  rank 0 serves Prometheus gauges on :{cfg['train']['metrics_port']} while it trains")
        self.children.run("pretrain", py("torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                         "-m", "model.train", "--config", str(config)))

    def upcycle(self) -> None:
        self.children.run("upcycle", py("model.cli", "upcycle", "--checkpoint", str(self.out / "dense" / "final"),
                                        "--experts", "4", "--top-k", "2", "--out", str(self.out / "moe-init")))

    def teacher(self) -> Path:
        """The pretrained dense model as a Hugging Face Llama: the workers' teacher (export writes the project's
        chat template)."""
        hf = self.out / "teacher"
        if not (hf / "config.json").exists():
            self.children.run("export-teacher", py("model.cli", "export", "--checkpoint",
                                                   str(self.out / "dense" / "final"), "--out", str(hf)))
        return hf

    def start_coordinator(self) -> None:
        s = self.scale
        teacher = self.teacher()
        state = self.out / "coordinator"
        write_yaml(self.project, {
            "run": "demo", "state_dir": str(state),
            "leases": {"duration_s": 30, "heartbeat_interval_s": 3, "sweep_interval_s": 1, "max_attempts": 3},
            "limits": {"max_leases_per_token": 2, "no_work_retry_s": 2},
            "synthetic": {
                "personas": [str(REPO / "configs" / "personas.ja.yaml")],
                "seeds": [str(self.out / "corpus" / "eval.jsonl")], "languages": ["ja"],
                "templates": ["qa", "summary", "rephrase"], "teacher": {"name": "demo-dense", "path": str(teacher)},
                "sampling": {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": s.max_new_tokens, "seed": 0},
                "batch_size": 2, "judge_batch_size": 4, "max_prompts": s.prompts, "max_seed_chars": 120,
                "min_output_chars": 20, "tokenizer": str(self.out / "tokenizer")},
            "swarm": {"inner_steps": s.swarm_inner_steps, "rounds": s.swarm_rounds, "batch_size": 4,
                      "micro_batch_size": 4, "seq_len": 64, "inner_lr": 1.0e-3, "inner_warmup_steps": 2,
                      "averaging_timeout": 60.0, "replication": 2, "checkpoint_every": 1,
                      "workers": s.workers, "shards": str(self.out / "shards" / "train")},
        })
        self.grpc_port_file = state / "grpc.port"
        self.grpc_port_file.unlink(missing_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        self.http_port, self.metrics_port = self.port(STATUS_PORT), self.port(PROMETHEUS_PORTS["metrics"])
        self.coordinator = self.children.start("coordinator", self.coord_cli(
            "serve", "--listen", "127.0.0.1:0", "--http-port", str(self.http_port), "--http-host", "127.0.0.1",
            "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1",
            "--port-file", str(self.grpc_port_file)))
        wait_file(self.grpc_port_file, self.coordinator, "the coordinator")
        self.target = f"127.0.0.1:{self.grpc_port_file.read_text().strip()}"
        print(f"  coordinator on {self.target}; status page http://127.0.0.1:{self.http_port}/ ; "
              f"metrics http://127.0.0.1:{self.metrics_port}/metrics")

    def tokens(self) -> dict[str, str]:
        """One token per volunteer, created once and kept in OUT/tokens.json (mode 0600) for reruns."""
        path = self.out / "tokens.json"
        tokens = json.loads(path.read_text()) if path.exists() else {}
        for i in range(1, self.scale.workers + 1):
            name = f"volunteer-{i}"
            if name not in tokens:
                tokens[name] = self.children.capture(self.coord_cli("token", "add", name)).strip().splitlines()[-1]
                path.touch(mode=0o600)
                path.write_text(json.dumps(tokens, indent=1))
        return tokens

    def counts(self) -> dict[str, dict[str, int]]:
        st = http_json(f"http://127.0.0.1:{self.http_port}/api/status")
        out: dict[str, dict[str, int]] = {}
        for t in st["tasks"]:
            out.setdefault(t["kind"], {})[t["state"]] = t["count"]
        return out

    def coordinator_and_workers(self) -> None:
        self.start_coordinator()  # always: the swarm stage, the status page and the ledger need it too
        if (self.out / "synthetic.done").exists():
            print("  synthetic data: done before (skipped)")
        else:
            self.synthetic()

    def start_workers(self) -> None:
        """3 worker daemons, each with its own volunteer token and metrics port; they stay up for the swarm."""
        if self.workers:
            return
        teacher = self.out / "teacher"
        for i, (name, token) in enumerate(sorted(self.tokens().items())):
            port = self.port(PROMETHEUS_PORTS["workers"][i % 3])
            self.worker_ports.append(port)
            self.workers.append(self.children.start(f"worker-{i + 1}", py(
                "worker.cli", "run", "--coordinator", self.target, "--token", token, "--name", f"demo-{name}",
                "--teacher", f"demo-dense={teacher}", "--kinds", "generate,judge,train", "--no-benchmark",
                "--cache-dir", str(self.out / "workers" / name), "--metrics-port", str(port)),
                quiet=("heartbeat",)))
            print(f"  worker-{i + 1} ({name}) metrics on :{port}")

    def stop_workers(self) -> None:
        print("  stopping the workers (SIGTERM: each hands back what it holds)")
        self.children.stop(self.workers)
        self.workers = []

    def watch_tasks(self, what: str, done) -> None:
        """Print the task counts whenever they change until `done(counts)`; fail when a worker dies or nothing
        moves for STALL_S seconds."""
        last, changed = None, time.monotonic()
        while True:
            for i, w in enumerate(self.workers):
                if w.poll() is not None:
                    raise SystemExit(f"demo: worker-{i + 1} exited {w.returncode}; "
                                     f"see {self.out}/logs/worker-{i + 1}.log")
            c = self.counts()
            line = "  tasks: " + "; ".join(f"{k} " + ", ".join(f"{s} {n}" for s, n in sorted(v.items()))
                                         for k, v in sorted(c.items()))
            if line != last:
                print(line, flush=True)
                last, changed = line, time.monotonic()
            elif time.monotonic() - changed > STALL_S:
                raise SystemExit(f"demo: no {what} task changed state in {STALL_S} s; see {self.out}/logs/")
            if done(c):
                return
            time.sleep(1.0)

    def synthetic(self) -> None:
        print("  " + self.children.capture(self.coord_cli("plan")).strip())
        self.start_workers()

        def settled(c: dict) -> bool:
            if any(c.get(k, {}).get(s, 0) for k in c for s in ("pending", "leased")):
                return False
            # generate done -> plan adds judge tasks and shards what was accepted; nothing added: done
            plan = self.children.capture(self.coord_cli("plan")).strip()
            print("  " + plan)
            added = re.search(r"added (\d+) generate and (\d+) judge", plan)
            if added is None:
                raise SystemExit(f"demo: unexpected output of `mujina-coordinator plan`: {plan}")
            if added.groups() == ("0", "0"):
                return True
            time.sleep(PAGE_CACHE_S)  # the status page may still show the counts from before this plan
            return False

        self.watch_tasks("synthetic", settled)
        print("  all synthetic tasks are done")
        (self.out / "synthetic.done").write_text("ok\n")

    def swarm(self) -> None:
        """Swarm rounds (issue 6): the workers train the upcycled MoE, each round H local steps and then an
        average of every module among its holders over hivemind; the coordinator merges each round."""
        status_path = self.out / "coordinator" / "swarm" / "demo.json"
        if not status_path.exists():
            print("  " + self.children.capture(self.coord_cli("init-swarm", "--checkpoint",
                                                          str(self.out / "moe-init"))).strip())
        self.start_workers()
        rounds = self.scale.swarm_rounds
        seen = [None]

        def finished(_c: dict) -> bool:
            st = json.loads(status_path.read_text())
            if st["round"] != seen[0]:
                seen[0] = st["round"]
                print(f"  swarm round {st['round']}/{rounds}: start {st['checkpoint']}; holders "
                      f"{ {w[:8]: e for w, e in (st.get('assignment') or {}).items()} }", flush=True)
            return st["round"] >= rounds

        self.watch_tasks("swarm", finished)
        self.stop_workers()
        (self.out / "swarm.done").write_text(json.loads(status_path.read_text())["checkpoint"] + "\n")

    def moe(self) -> None:
        """The MoE after the swarm continues on the corpus and the volunteers' accepted synthetic records:
        the swarm's rounds trained on leases of the corpus shards only."""
        s = self.scale
        start = self.out / "moe-init"
        if (self.out / "swarm.done").exists():
            start = self.out / "coordinator" / "checkpoints" / (self.out / "swarm.done").read_text().strip()
        print(f"  from {start}")
        mixture = [{"path": str(self.out / "shards" / "train"), "weight": 0.8}]
        synth = self.out / "coordinator" / "synthetic" / "shards"
        if (synth / "manifest.json").exists():
            mixture.append({"path": str(synth), "weight": 0.2})
            print(f"  mixture: corpus shards 0.8 + synthetic shards 0.2 ({synth})")
        cfg = {"init_from": str(start), "out": str(self.out / "moe"),
               "data": {"source": "shards", "seq_len": s.seq_len, "mixture": mixture,
                        "eval_mixture": [{"path": str(self.out / "shards" / "eval"), "weight": 1.0}]},
               "optim": {"lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_steps": max(1, s.moe_steps // 10)},
               "train": {"steps": s.moe_steps, "batch_size": 16, "micro_batch_size": 8, "seed": 1,
                         "log_every": max(1, s.moe_steps // 5), "eval_every": s.moe_steps, "eval_batches": 2,
                         "save_every": max(1, s.moe_steps // 2)}}
        self.children.run("moe", py("model.train", "--config", str(write_yaml(self.out / "moe.yaml", cfg))))

    def posttrain(self) -> None:
        """Tanuki's order on the volunteers' data: LoRA SFT on the accepted chat records (their shards), merged
        into sft/final, then LoRA DPO on the judge's pairs from it, so the SFT model is DPO's reference."""
        s, synth = self.scale, self.out / "coordinator" / "synthetic"
        start = self.out / "moe" / "final"
        lora = {"mode": "lora", "r": 8, "alpha": 16}
        if (synth / "shards" / "manifest.json").exists():
            cfg = {"finetune": {**lora, "init_from": str(start)}, "out": str(self.out / "sft"),
                   "data": {"source": "shards", "seq_len": s.seq_len,
                            "mixture": [{"path": str(synth / "shards"), "weight": 1.0}]},
                   "optim": {"lr": 2.0e-3, "min_lr": 2.0e-4, "warmup_steps": 1},
                   "train": {"objective": "sft", "phase": "sft", "steps": s.sft_steps, "batch_size": 8,
                             "micro_batch_size": 8, "seed": 2, "log_every": max(1, s.sft_steps // 4),
                             "eval_every": 0, "save_every": s.sft_steps}}
            self.children.run("sft", py("model.train", "--config", str(write_yaml(self.out / "sft.yaml", cfg))))
            start = self.out / "sft" / "final"
        else:
            print("  no synthetic shards (no record was accepted): SFT skipped")
        pairs = synth / "dpo.jsonl"
        n = sum(1 for line in pairs.open(encoding="utf-8") if line.strip()) if pairs.exists() else 0
        if n:
            print(f"  DPO on {n} pairs the judge chose, from {start}")
        else:  # a teacher this small rarely writes a verdict the coordinator can parse
            pairs, n = self.constructed_pairs(synth / "generated.jsonl")
            if n == 0:
                print("  the judge chose no pair and fewer than 2 records were accepted: DPO skipped")
                return
            print(f"  the judge chose no pair (its verdicts were unparsable): DPO on {n} constructed pairs instead, "
                  f"each accepted answer preferred over another prompt's, from {start}")
        cfg = {"finetune": {**lora, "init_from": str(start), "beta": 0.1}, "out": str(self.out / "dpo"),
               "data": {"source": "dpo", "path": str(pairs), "seq_len": 1024, "eval_fraction": 0.0},
               "optim": {"lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_steps": 1},
               "train": {"objective": "dpo", "phase": "dpo", "steps": s.dpo_steps, "batch_size": 4,
                         "micro_batch_size": 2, "seed": 3, "log_every": max(1, s.dpo_steps // 4), "eval_every": 0,
                         "save_every": s.dpo_steps}}
        self.children.run("dpo", py("model.train", "--config", str(write_yaml(self.out / "dpo.yaml", cfg))))

    def constructed_pairs(self, generated: Path) -> tuple[Path, int]:
        """Preference pairs from the accepted records alone: each prompt's answer (chosen) over the next record's
        answer (rejected, an answer to another prompt), in the coordinator's dpo.jsonl format."""
        records = [json.loads(x) for x in generated.read_text(encoding="utf-8").splitlines() if x.strip()] \
            if generated.exists() else []
        out = self.out / "dpo_constructed.jsonl"
        if len(records) < 2:
            return out, 0
        with out.open("w", encoding="utf-8") as f:
            for rec, other in zip(records, records[1:] + records[:1], strict=True):
                f.write(json.dumps({"prompt": rec["messages"][:-1], "chosen": rec["messages"][-1]["content"],
                                    "rejected": other["messages"][-1]["content"]}, ensure_ascii=False) + "\n")
        return out, len(records)

    def posttrain_once(self) -> None:
        self.posttrain()
        (self.out / "posttrain.done").write_text("done\n")

    @property
    def chat_model(self) -> Path:
        """The newest model of the pipeline: DPO's, else SFT's, else the MoE's."""
        return next(d / "final" for d in (self.out / "dpo", self.out / "sft", self.out / "moe")
                    if (d / "final" / "config.json").exists())

    def results(self) -> None:
        print("  leaderboard (mujina-coordinator ledger):")
        for line in self.children.capture(self.coord_cli("ledger")).splitlines():
            print("    " + line)
        for name in ("dense", "moe", "sft", "dpo"):
            m = [r for r in last_metrics(self.out / name / "metrics.jsonl") if "loss" in r]
            if m:
                ev = [r["eval_loss"] for r in m if "eval_loss" in r]
                print(f"  {name}: loss {m[0]['loss']:.3f} (step {m[0]['step']}) -> {m[-1]['loss']:.3f} "
                      f"(step {m[-1]['step']})" + (f"; eval loss {ev[-1]:.3f}" if ev else "")
                      + (f"; reward margin {m[-1]['rewards/margins']:.3f}" if "rewards/margins" in m[-1] else ""))
        for series in http_json(f"http://127.0.0.1:{self.http_port}/api/status")["loss"]:
            pts = series["points"]
            print(f"  {series['kind']} results ({len(pts)}): loss {pts[0][1]:.3f} -> {pts[-1][1]:.3f}")
        stats = self.out / "coordinator" / "synthetic" / "stats.json"
        if stats.exists():
            for kind, v in sorted(json.loads(stats.read_text()).items()):
                print(f"  synthetic {kind}: {v['accepted']} accepted, {v['tokens']} tokens, rejected {v['rejected']}")

    def sample(self) -> None:
        hf = self.out / "hf"
        model = self.chat_model
        source = hf / "source.json"  # which model the export holds: a rerun after post-training exports again
        if not (source.exists() and json.loads(source.read_text()) == str(model)):
            shutil.rmtree(hf, ignore_errors=True)
            self.children.run("export", py("model.cli", "export", "--checkpoint", str(model), "--out", str(hf)))
            source.write_text(json.dumps(str(model)))
        print(f"  {model.parent.name}'s model with transformers (MixtralForCausalLM), from the prompt 東京の:")
        self.children.run("sample", py("model.cli", "sample", "--hf", str(hf), "--prompt", "東京の",
                                       "--max-new-tokens", "40", "--temperature", "0.8"))
        print("  and one chat turn through the export's chat template:")
        self.children.run("chat", py("model.cli", "chat", "--hf", str(hf), "--user", "東京について教えてください。",
                                     "--max-new-tokens", "40", "--temperature", "0.8"))

    def watch(self) -> None:
        ports = ", ".join(f":{p}" for p in self.worker_ports) or "(not started this time)"
        print(f"""  status page (leaderboard, loss, tasks, workers):  http://127.0.0.1:{self.http_port}/
  its JSON:                                        http://127.0.0.1:{self.http_port}/api/status
  Prometheus metrics: coordinator :{self.metrics_port}, workers {ports} and trainer rank 0 (while they run)
  Prometheus:  prometheus --config.file=dashboards/prometheus/prometheus.yml   (scrapes those ports)
  Grafana:     provision dashboards/grafana/ (docker run ... see dashboards/README.md), open the mujina folder
  The coordinator stops with the demo; to look again later:
    mujina-coordinator serve --config {self.project} --http-port 8080 --metrics-port 9401""")

    # ---- the whole run ---------------------------------------------------------------------------

    def check_out_dir(self) -> None:
        """OUT/demo.json records the scale; a directory of another scale (or of an older demo) is refused,
        since skipping its finished stages would mix two runs."""
        marker = self.out / "demo.json"
        if marker.exists():
            scale = json.loads(marker.read_text()).get("scale")
            if scale != self.scale_name:
                raise ValueError(f"{self.out} holds a demo run at scale {scale!r}, not {self.scale_name!r}: "
                                 f"rerun with --scale {scale}, or --fresh to start over")
        elif any(p.name != "logs" for p in self.out.iterdir()):
            raise ValueError(f"{self.out} holds files of another run (no demo.json): pass --fresh to delete it "
                             "(or `make clean`), or choose another --out")
        marker.write_text(json.dumps({"scale": self.scale_name}) + "\n")

    def run(self) -> None:
        o = self.out
        self.check_out_dir()
        print(f"mujina demo, scale {self.scale_name}: outputs in {o}, logs in {o / 'logs'}")
        self.stage(1, "corpus: Japanese/English documents from templates", (o / "corpus" / "eval.jsonl").exists(),
                   self.corpus)
        self.stage(2, f"tokenizer: SentencePiece unigram, {self.scale.vocab} pieces",
                   (o / "tokenizer" / "mujina_tokenizer.json").exists(), self.tokenizer)
        self.stage(3, "shards: filter, dedup, tokenise, pack", (o / "shards" / "eval" / "manifest.json").exists(),
                   self.shards)
        self.stage(4, f"pretrain the debug dense model with torchrun, 2 processes ({self.scale.pretrain_steps} steps)",
                   (o / "dense" / "final" / "config.json").exists(), self.pretrain)
        self.stage(5, "upcycle: dense -> MoE (4 experts, top-2)", (o / "moe-init" / "config.json").exists(),
                   self.upcycle)
        self.stage(6, "coordinator + 3 workers: synthetic data from the dense model as teacher", False,
                   self.coordinator_and_workers)
        self.stage(7, f"swarm: {self.scale.swarm_rounds} DiLoCo rounds of the MoE over hivemind by the 3 workers",
                   (o / "swarm.done").exists(), self.swarm)
        self.stage(8, f"MoE training on the corpus + synthetic data ({self.scale.moe_steps} steps)",
                   (o / "moe" / "final" / "config.json").exists(), self.moe)
        self.stage(9, f"post-training: LoRA SFT on the synthetic chat records ({self.scale.sft_steps} steps), then "
                      f"LoRA DPO on the judge's pairs ({self.scale.dpo_steps} steps)",
                   (o / "posttrain.done").exists(), self.posttrain_once)
        self.stage(10, "leaderboard and loss", False, self.results)
        self.stage(11, "export to Hugging Face, sample and chat with transformers", False, self.sample)
        self.stage(12, "watch it: status page, Prometheus, Grafana", False, self.watch)
        total = time.monotonic() - self.t0
        print(f"\n== done in {total:.0f} s: " + ", ".join(f"{i + 1}) {s:.0f} s" for i, (_, s, _) in
                                                      enumerate(self.timings)), flush=True)
        (o / "timings.json").write_text(json.dumps({"total_s": total, "stages": [
            {"stage": t, "seconds": round(s, 1), "state": r} for t, s, r in self.timings]}, indent=1))
        if self.serve:
            print("\n--serve: the coordinator keeps serving the status page; Ctrl-C to stop", flush=True)
            self.coordinator.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full", help="sizes: full (make demo) or tiny [full]")
    ap.add_argument("--out", default=str(REPO / "runs" / "demo"), help="output directory [runs/demo]")
    ap.add_argument("--ports", choices=["fixed", "auto"], default="fixed",
                    help="fixed: the ports dashboards/prometheus expects (8080, 9401-9405) when free; auto: any free")
    ap.add_argument("--serve", action="store_true", help="keep the coordinator and its status page up at the end")
    ap.add_argument("--fresh", action="store_true", help="delete --out first and run every stage")
    args = ap.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    demo = Demo(args)

    def on_signal(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one clean-up; a second Ctrl-C cannot interrupt it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        demo.run()
        return 0
    except ValueError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    except Stop as why:
        print(f"\n== {why}: stopping (rerun the same command to resume)", flush=True)
        return 130
    finally:
        demo.children.stop_all()


if __name__ == "__main__":
    sys.exit(main())

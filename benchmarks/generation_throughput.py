"""Generated tokens/s through the worker daemon next to transformers `generate` called directly.

    python benchmarks/generation_throughput.py [--json PATH] [--rounds 4] [--tasks 2] [--layers 1]

Both sides run the same teacher on the same prompts with the same sampling parameters and seeds:
  * daemon: a real `mujina-coordinator serve` subprocess (SQLite) and a real `mujina-worker run`
    subprocess. Each round adds `--tasks` generate tasks (planned by `mujina-coordinator plan` from a
    synthetic section, in a staging store) to the live store (Scheduler.add_task in this process, what
    `mujina-coordinator tasks add` does, without a process start beside the timed run); the daemon leases,
    generates, uploads and the coordinator validates and accepts them. The round's time is the window
    from the first lease's grant to the last result's acceptance (coordinator timestamps: leases.granted,
    results.at), so it holds every lease, heartbeat, upload, validation and the gaps between tasks.
    Tokens are the accepted results' `output_tokens`.
  * direct: this process loads the same directory with AutoModelForCausalLM / AutoTokenizer and calls
    `generate` on each task's prompts in the same batches with the same seeds (what an engineer would
    write by hand); tokens are counted up to the first EOS/pad like the executor does.
Rounds alternate which side goes first; a warm-up task (and a warm-up direct call) loads the model on
both sides before timing. Both sides use one thread (OMP_NUM_THREADS=1 / torch.set_num_threads(1)).

The teacher is tests/worker/teacher.py's character-bigram Llama padded with real compute (`--layers`
layers of hidden size ~624 with random inner weights and zero output projections), because the
coordinator's validators refuse random text: the accepted text is what the daemon is timed on.

JSON keys: ratio_vs_direct (daemon tokens/s / direct tokens/s over all rounds; goal >= 0.9),
cpu_ratio_vs_direct (the same per CPU second: worker + coordinator processes vs this process; robust
to other load on a shared machine),
daemon_tokens_per_s, direct_tokens_per_s, identical_outputs (the daemon's records equal the direct
outputs), rounds (per round figures), load_average, settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _coord(*args: str, check: bool = True) -> str:
    out = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=REPO, env=_env(),
                         capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"mujina-coordinator {' '.join(args[:2])} failed:\n{out.stderr}")
    return out.stdout


def _project(root: Path, teacher: Path, seeds: Path, args) -> Path:
    import yaml

    doc = {"run": "genbench", "state_dir": str(root / "state"),
           "leases": {"duration_s": 60.0, "heartbeat_interval_s": 5.0},
           "limits": {"no_work_retry_s": 0.2, "max_leases_per_token": 4},
           "synthetic": {"personas": [str(REPO / "configs" / "personas.ja.yaml")], "seeds": [str(seeds)],
                         "languages": ["ja"], "templates": ["qa", "summary", "rephrase"],
                         "teacher": {"name": "bench", "path": str(teacher)},
                         "sampling": {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": args.max_new_tokens,
                                      "seed": 0},
                         "batch_size": args.batch_size, "max_prompts": args.batch_size * (args.rounds * args.tasks + 1),
                         "min_output_chars": 10}}
    root.mkdir(parents=True)
    path = root / "project.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _payloads(db: Path) -> list[dict]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT payload FROM tasks WHERE kind = 'generate' ORDER BY id").fetchall()
    return [json.loads(r[0]) for r in rows]


class Direct:
    """transformers `generate` by hand on the same directory, batches and seeds as the executor."""

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(self, payload: dict) -> tuple[list[str], int]:
        torch, tok = self.torch, self.tok
        s, bs = payload["sampling"], int(payload["batch_size"])
        msgs = [p["messages"] for p in payload["prompts"]]
        texts, n_tokens = [], 0
        stop = {tok.eos_token_id, tok.pad_token_id}
        for b, i in enumerate(range(0, len(msgs), bs)):
            chats = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs[i: i + bs]]
            enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(int(s["seed"]) + b)
            with torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=int(s["max_new_tokens"]), do_sample=True,
                                          temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                                          pad_token_id=tok.pad_token_id)
            for ids in out[:, enc["input_ids"].shape[1]:].tolist():
                end = next((k for k, t in enumerate(ids) if t in stop), len(ids))
                texts.append(tok.decode(ids[:end], skip_special_tokens=True))
                n_tokens += end
        return texts, n_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (each: daemon and direct)")
    ap.add_argument("--tasks", type=int, default=2, help="generate tasks per round")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per task and per generate() call")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=1, help="teacher layers (hidden size ~624)")
    ap.add_argument("--intermediate", type=int, default=1664, help="teacher MLP size")
    args = ap.parse_args()

    import torch

    from coordinator import store as S
    from coordinator.config import load_project
    from coordinator.scheduler import Scheduler
    from tests.data_shards.corpus import japanese_documents, write_jsonl
    from tests.worker.teacher import build_teacher

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="mujina-genbench-"))
    teacher = build_teacher(tmp / "teacher", japanese_documents(30, seed=3), num_layers=args.layers,
                            intermediate_size=args.intermediate)
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        teacher).parameters())
    seeds = write_jsonl(tmp / "seeds.jsonl", japanese_documents(6, seed=5))
    # staging: `plan` writes every round's tasks here; they are added to the live coordinator round by round
    staging = _project(tmp / "staging", teacher, seeds, args)
    _coord("plan", "--config", str(staging), "--db", f"sqlite:///{tmp / 'staging' / 'plan.db'}")
    payloads = _payloads(tmp / "staging" / "plan.db")
    need = args.rounds * args.tasks + 1
    if len(payloads) < need:
        raise SystemExit(f"plan made {len(payloads)} tasks, need {need}")
    live = _project(tmp / "live", teacher, seeds, args)
    db = tmp / "live" / "state" / "coordinator.db"
    (tmp / "live" / "state").mkdir()
    dburl = f"sqlite:///{db}"
    token = _coord("token", "add", "bench", "--config", str(live), "--db", dburl).strip().splitlines()[-1]
    port_file = tmp / "port"
    logs = open(tmp / "coordinator.log", "wb"), open(tmp / "worker.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(live), "--db", dburl,
                               "--listen", "127.0.0.1:0", "--port-file", str(port_file)], cwd=REPO, env=_env(),
                              stdout=logs[0], stderr=subprocess.STDOUT)
    worker = None
    try:
        while not port_file.exists() or not port_file.read_text().strip():
            if server.poll() is not None:
                raise SystemExit((tmp / "coordinator.log").read_text())
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "run", "--coordinator", target, "--token", token,
                                   "--cache-dir", str(tmp / "worker"), "--no-benchmark", "--kinds", "generate",
                                   "--teacher", f"bench={teacher}"], cwd=REPO, env=_env(),
                                  stdout=logs[1], stderr=subprocess.STDOUT)

        def daemon_round(batch: list[dict]) -> dict:
            cpu0 = _cpu_seconds(worker.pid) + _cpu_seconds(server.pid)
            ids = [scheduler.add_task("generate", p) for p in batch]  # milliseconds: the worker polls every 0.2 s
            marks = ",".join("?" * len(ids))
            while True:
                if worker.poll() is not None:
                    raise SystemExit("the worker exited:\n" + (tmp / "worker.log").read_text())
                with sqlite3.connect(db) as conn:
                    states = dict(conn.execute(f"SELECT state, count(*) FROM tasks WHERE id IN ({marks}) "
                                               "GROUP BY state", ids).fetchall())
                    if states.get("done") == len(ids):
                        t0 = conn.execute(f"SELECT min(granted) FROM leases WHERE task_id IN ({marks})",
                                          ids).fetchone()[0]
                        res = conn.execute(f"SELECT task_id, at, metrics, path FROM results WHERE task_id IN "
                                           f"({marks})", ids).fetchall()
                        break
                    if set(states) - {"pending", "leased", "done"}:
                        raise SystemExit(f"tasks ended {states}:\n" + (tmp / "worker.log").read_text())
                time.sleep(0.05)
            by_id = {r[0]: r for r in res}
            texts = []
            for tid in ids:
                recs = [json.loads(x) for x in (tmp / "live" / "state" / by_id[tid][3]).read_text().splitlines()]
                texts += [r["output"] for r in recs]
            cpu = _cpu_seconds(worker.pid) + _cpu_seconds(server.pid) - cpu0
            return {"seconds": max(r[1] for r in res) - t0, "cpu": cpu,
                    "tokens": int(sum(json.loads(r[2])["output_tokens"] for r in res)), "texts": texts}

        def direct_round(batch: list[dict]) -> dict:
            t0, cpu0 = time.perf_counter(), time.process_time()
            texts, tokens = [], 0
            for p in batch:
                t, n = direct.run(p)
                texts += t
                tokens += n
            return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - cpu0, "tokens": tokens,
                    "texts": texts}

        # the organizer's side, in this process: tasks go into the live store, which the server reads
        scheduler = Scheduler(S.Store.open(dburl), load_project(live))
        direct = Direct(teacher)
        direct_round(payloads[:1])      # warm-up: model loaded, first call paid on both sides
        daemon_round(payloads[:1])
        rounds = []
        for r in range(args.rounds):
            batch = payloads[1 + r * args.tasks: 1 + (r + 1) * args.tasks]
            load = os.getloadavg()[0]
            if r % 2 == 0:
                d, x = daemon_round(batch), direct_round(batch)
            else:
                x, d = direct_round(batch), daemon_round(batch)
            rounds.append({"round": r, "load_average": round(load, 2), "daemon_s": round(d["seconds"], 3),
                           "daemon_tokens": d["tokens"], "direct_s": round(x["seconds"], 3),
                           "direct_tokens": x["tokens"], "identical": d["texts"] == x["texts"],
                           "daemon_cpu_s": round(d["cpu"], 3), "direct_cpu_s": round(x["cpu"], 3),
                           "ratio": round((d["tokens"] / d["seconds"]) / (x["tokens"] / x["seconds"]), 3)})
    finally:
        for p in (worker, server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    dt = sum(r["daemon_tokens"] for r in rounds) / sum(r["daemon_s"] for r in rounds)
    xt = sum(r["direct_tokens"] for r in rounds) / sum(r["direct_s"] for r in rounds)
    cpu_ratio = (sum(r["direct_cpu_s"] for r in rounds) / sum(r["direct_tokens"] for r in rounds)) / (
        sum(r["daemon_cpu_s"] for r in rounds) / sum(r["daemon_tokens"] for r in rounds))
    print(f"teacher: {n_params / 1e6:.1f}M parameters ({args.layers} layers), {args.tasks} tasks x "
          f"{args.batch_size} prompts x {args.max_new_tokens} new tokens per round; 1 thread each side")
    print(f"{'round':>5} {'load':>5} {'daemon s':>9} {'cpu s':>6} {'tokens':>7} {'direct s':>9} {'cpu s':>6} "
          f"{'tokens':>7} {'same':>5} {'ratio':>6}")
    for r in rounds:
        print(f"{r['round']:>5} {r['load_average']:>5.2f} {r['daemon_s']:>9.2f} {r['daemon_cpu_s']:>6.2f} "
              f"{r['daemon_tokens']:>7} {r['direct_s']:>9.2f} {r['direct_cpu_s']:>6.2f} {r['direct_tokens']:>7} "
              f"{str(r['identical']):>5} {r['ratio']:>6.3f}")
    result = {"ratio_vs_direct": round(dt / xt, 3), "cpu_ratio_vs_direct": round(cpu_ratio, 3),
              "daemon_tokens_per_s": round(dt, 1),
              "direct_tokens_per_s": round(xt, 1), "identical_outputs": all(r["identical"] for r in rounds),
              "rounds": rounds, "load_average": list(os.getloadavg()),
              "settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "parameters": n_params}}
    print(f"daemon {dt:.1f} tokens/s, direct {xt:.1f} tokens/s: ratio_vs_direct {dt / xt:.3f} (goal >= 0.9); "
          f"per CPU second (worker + coordinator vs this process): {cpu_ratio:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

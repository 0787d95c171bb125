"""Cluster mode's scaling on this machine: training tokens/s of the same run on 1 and 2 processes.

    python benchmarks/cluster_scaling.py                    # ~2 minutes on 2 CPU cores
    python benchmarks/cluster_scaling.py --json out.json --steps 40 --hidden 256

Both runs are `torchrun --standalone --nproc_per_node N -m model.train` (gloo, FSDP2 on CPU) with the
same config and global batch; 1 process is torchrun too, so both pay the launcher and only the
parallelism differs. Each process gets one intra-op thread (torchrun's default): 1 process uses one
core, 2 processes use both. tokens/s is read from the trainer's own metrics.jsonl (all processes,
median over the logged intervals after --warmup steps), so it times training steps, not start-up.

ratio = tokens/s on 2 processes / tokens/s on 1 (ideal 2.0 on two idle cores; FSDP's all-gather
and reduce-scatter over loopback, and another job on the machine, take it lower). The two runs
alternate --repeats times so noise hits both; the table shows every repeat and the median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(nproc: int, config: Path, out: Path) -> tuple[float, list[dict]]:
    """Train; return (wall seconds, the run's metrics.jsonl records)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "model.train", "--config", str(config), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"torchrun --nproc_per_node {nproc} failed:\n{proc.stderr[-3000:]}")
    return wall, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run [30]")
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the median [5]")
    ap.add_argument("--repeats", type=int, default=2, help="alternating 1/2-process pairs [2]")
    ap.add_argument("--hidden", type=int, default=256, help="model width [256]")
    ap.add_argument("--layers", type=int, default=4, help="blocks [4]")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence [256]")
    ap.add_argument("--batch", type=int, default=16, help="global batch in sequences [16]")
    args = ap.parse_args()

    cfg = {
        "model": {"preset": "debug", "hidden_size": args.hidden, "intermediate_size": args.hidden * 3,
                  "num_layers": args.layers, "num_heads": max(args.hidden // 64, 1),
                  "num_kv_heads": max(args.hidden // 128, 1), "vocab_size": 4096, "max_seq_len": args.seq_len},
        "data": {"source": "synthetic", "seq_len": args.seq_len},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 5},
        "train": {"steps": args.steps, "batch_size": args.batch, "micro_batch_size": args.batch // 2,
                  "log_every": 1, "eval_every": 0, "save_every": 0},
    }
    rows, per = [], {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="mujina-scaling-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        for rep in range(args.repeats):
            for nproc in (1, 2):
                load = os.getloadavg()[0]
                wall, recs = run(nproc, config, Path(tmp) / f"run{rep}_{nproc}")
                tps = statistics.median(r["tokens_per_s"] for r in recs if r["step"] > args.warmup)
                per[nproc].append(tps)
                rows.append({"repeat": rep, "processes": nproc, "tokens_per_s": tps, "wall_s": wall,
                             "final_loss": recs[-1]["loss"], "load_before": load})
    one, two = statistics.median(per[1]), statistics.median(per[2])
    print(f"model: hidden {args.hidden}, {args.layers} layers, seq {args.seq_len}, global batch {args.batch}, "
          f"{args.steps} steps; gloo on CPU, 1 thread per process\n")
    print("| repeat | processes | tokens/s | wall s | final loss | load before |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['repeat']} | {r['processes']} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} | "
              f"{r['final_loss']:.4f} | {r['load_before']:.1f} |")
    print(f"\nmedian tokens/s: 1 process {one:.0f}, 2 processes {two:.0f}; ratio {two / one:.2f} (ideal 2.0)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "config": cfg, "rows": rows, "tokens_per_s_1": one, "tokens_per_s_2": two,
            "ratio_2_vs_1": two / one}, indent=2))


if __name__ == "__main__":
    main()

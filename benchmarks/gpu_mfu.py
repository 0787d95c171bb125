"""MFU of the cluster trainer on a GPU machine: `small` and a ~1B config in bf16.

    python benchmarks/gpu_mfu.py --json out.json                      # every visible GPU, ~5 minutes
    python benchmarks/gpu_mfu.py --cases 1b --nproc 1 --compile both

Each case runs `torchrun --standalone --nproc_per_node N -m model.train` on synthetic data (no data
loading cost) with bf16 parameters and fp32 gradient reductions (FSDP2's MixedPrecisionPolicy; on one
process, bf16 autocast), and reads tokens/s and MFU from the trainer's own metrics.jsonl: MFU =
tokens/s per GPU x FLOPs per token (6N + 12·L·d·S, N without the input embedding, active parameters
only for MoE) / the GPU's dense bf16 peak (model/parallel.py's table, or --peak-tflops). The median
over the logged intervals after --warmup steps is reported, so compilation and start-up are excluded.

torchtitan reports 40-50% MFU for Llama-class models on H100 in bf16; the issue's goal is >= 40% on one
H100. On CPU this script exits: there is no meaningful MFU without a GPU (use cluster_scaling.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from model.config import ModelConfig  # noqa: E402
from model.parallel import flops_per_token  # noqa: E402

CASES = {
    # The `small` preset as the project defines it, at its full context.
    "small": {"model": {"preset": "small"}, "seq_len": 1024, "micro_batch": 16},
    # ~1.2B: Llama-style width 2048, 16 blocks, GQA 16/8 heads, the Tanuki vocabulary.
    "1b": {"model": {"preset": "small", "hidden_size": 2048, "intermediate_size": 5632, "num_layers": 16,
                     "num_heads": 16, "num_kv_heads": 8, "vocab_size": 65000, "max_seq_len": 2048},
           "seq_len": 2048, "micro_batch": 8},
}


def run_case(name: str, case: dict, nproc: int, compile_: bool, ac: bool, steps: int, warmup: int,
             peak_tflops: float, tmp: Path) -> dict:
    mcfg = ModelConfig.from_dict(case["model"])
    seq = min(case["seq_len"], mcfg.max_seq_len)
    micro = case["micro_batch"]
    cfg = {
        "model": case["model"],
        "data": {"source": "synthetic", "seq_len": seq},
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 10},
        "train": {"steps": steps, "batch_size": micro * nproc, "micro_batch_size": micro, "log_every": 1,
                  "eval_every": 0, "save_every": 0, "dtype": "bf16", "compile": compile_,
                  "activation_checkpointing": ac, "peak_tflops": peak_tflops},
    }
    config, out = tmp / f"{name}-{compile_}-{ac}.yaml", tmp / f"{name}-{compile_}-{ac}"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "model.train", "--config", str(config), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": name, "error": proc.stderr[-2000:]}
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["step"] > warmup]
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None
    return {"case": name, "params": mcfg.num_params(), "seq_len": seq, "micro_batch": micro, "processes": nproc,
            "compile": compile_, "activation_checkpointing": ac, "tokens_per_s": tps,
            "tokens_per_s_per_gpu": tps / nproc, "flops_per_token": flops_per_token(mcfg, seq), "mfu": mfu,
            "final_loss": recs[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cases", default="small,1b", help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--nproc", type=int, default=0, help="processes (GPUs); 0: every visible GPU")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both", help="torch.compile the blocks")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=0, help="override every case's micro-batch size")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded (compilation, allocator warm-up)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_mfu.py needs a CUDA GPU; on CPU run benchmarks/cluster_scaling.py")
    nproc = args.nproc or torch.cuda.device_count()
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mujina-mfu-") as tmp:
        for name in args.cases.split(","):
            case = {**CASES[name], **({"micro_batch": args.micro_batch} if args.micro_batch else {})}
            for c in compiles:
                rows.append(run_case(name, case, nproc, c, args.activation_checkpointing, args.steps,
                                     args.warmup, args.peak_tflops, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0)
    print(f"\n{device}, {nproc} GPU(s), bf16, torch {torch.__version__}\n")
    print("| case | params | seq | micro-batch | compile | tokens/s/GPU | MFU |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['case']} | {r['params'] / 1e9:.2f}B | {r['seq_len']} | {r['micro_batch']} | {r['compile']} | "
              f"{r['tokens_per_s_per_gpu']:.0f} | {mfu} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                         "device": device, "gpus": nproc, "torch": torch.__version__,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

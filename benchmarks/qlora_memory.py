"""QLoRA against LoRA: peak memory and step time of the same adapter training, base in NF4 or not.

    python benchmarks/qlora_memory.py --json out.json            # CPU: peak RSS; CUDA: max_memory_allocated
    python benchmarks/qlora_memory.py --device cuda --bf16

Each mode runs in a fresh process: load a saved MoE checkpoint on CPU, add adapters (r 8, every linear and the
experts), quantise the base for QLoRA (model/qlora.py; onto the device weight by weight), then AdamW steps on
the adapters. Reported: the parameters' bytes, the memory after building and the peak over the steps (CPU:
the resident set, its high-water mark reset after building, via /proc/self/clear_refs; CUDA:
max_memory_allocated, reset after building), and the median step time. Step times on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = dict(preset="debug", num_layers=4, hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=4,
             vocab_size=1024, max_seq_len=256, moe=dict(num_experts=8, top_k=2))
BATCH, SEQ_LEN, STEPS = 4, 128, 4
MB = 2 ** 20


def _rss_mb(field: str) -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


def probe(checkpoint: str, mode: str, device: str, bf16: bool) -> dict:
    from model.checkpoint import load_checkpoint
    from model.lora import LoraSpec, add_lora

    dev = torch.device(device)
    net = load_checkpoint(checkpoint, device="cpu" if mode == "qlora" else dev, dtype=torch.float32)
    add_lora(net, LoraSpec(r=8, alpha=16), generator=torch.Generator().manual_seed(0))
    if mode == "qlora":
        from model.qlora import quantize_base

        quantize_base(net, dev)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    param_mb = sum(p.numel() * p.element_size() for p in net.parameters()) / MB
    if dev.type == "cuda":
        torch.cuda.synchronize()
        built = torch.cuda.memory_allocated() / MB
        torch.cuda.reset_peak_memory_stats()
    else:
        built = _rss_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the steps alone
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ_LEN), device=dev)
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = net(ids).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / MB if dev.type == "cuda" else _rss_mb("VmHWM")
    return dict(mode=mode, device=device, bf16=bf16, param_MiB=round(param_mb, 1), built_MiB=round(built, 1),
                peak_MiB=round(peak, 1), step_s=round(sorted(times[1:])[len(times[1:]) // 2], 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA's default in mujina-train)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(**json.loads(args.probe))))
        return
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.transformer import Transformer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_checkpoint(Path(tmp) / "moe", Transformer(ModelConfig.from_dict(MODEL)))
        for mode in ("lora", "qlora"):
            kw = dict(checkpoint=str(Path(tmp) / "moe"), mode=mode, device=args.device, bf16=args.bf16)
            out = subprocess.run([sys.executable, __file__, "--probe", json.dumps(kw)], check=True,
                                 capture_output=True, text=True, cwd=REPO)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'mode':6s} {'params MiB':>10s} {'built MiB':>10s} {'peak MiB':>9s} {'step s':>7s}")
    for r in rows:
        print(f"{r['mode']:6s} {r['param_MiB']:10.1f} {r['built_MiB']:10.1f} {r['peak_MiB']:9.1f} {r['step_s']:7.3f}")
    print(f"QLoRA / LoRA peak: {rows[1]['peak_MiB'] / rows[0]['peak_MiB']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

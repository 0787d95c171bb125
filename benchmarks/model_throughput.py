"""Training throughput of mujina's model against Hugging Face transformers, on CPU, in one run.

    python benchmarks/model_throughput.py                       # all four cases, 2-4 minutes
    python benchmarks/model_throughput.py --cases small-moe --steps 5

What is measured: one training step = forward, next-token cross-entropy on the shifted
targets, backward, then zeroing the gradients. No optimizer step: it would be the same
AdamW on the same tensors for both and would only dilute the difference. Each case builds
mujina's `Transformer` and its transformers twin (`LlamaForCausalLM` for dense presets,
`MixtralForCausalLM` for MoE) with the *same weights*, exported through `model.hf`, so a
MoE sends the same tokens to the same experts in both (routing balance sets how much work
each expert does). The twins are checked to produce the same logits before timing.

Both run in float32 with the default attention (SDPA) and transformers' default experts
implementation, with the thread count torch picks. After `--warmup` untimed steps each,
the two implementations alternate step by step (A B A B ...) so that machine noise hits
both equally; tokens/s is batch * seq divided by the median step time.

Reading the table: ratio = mujina tok/s / transformers tok/s. Above 1.0 mujina trains
faster on the same shapes; the goal is >= 1.0 in every case. Differences under ~5% are
within the noise of a 2-core machine: re-run before drawing conclusions. Another process
using a core slows a 2-thread step several-fold, so the script warns when the load average
shows one; take such a run's numbers as noise, not as a result.

The JSON file (--json) holds the same rows plus every step time, the best-step tok/s, the
load average around each case, and the machine and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
from model.checkpoint import save_checkpoint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.hf import export_hf  # noqa: E402
from model.transformer import Transformer  # noqa: E402

SEED = 0
MOE = {"num_experts": 8, "top_k": 2}


@dataclass(frozen=True)
class Case:
    """One model shape and the workload it is timed on."""

    name: str
    preset: str
    moe: bool
    batch: int
    seq: int
    steps: int  # timed steps per implementation

    def config(self) -> ModelConfig:
        return ModelConfig.from_dict({"preset": self.preset, **({"moe": MOE} if self.moe else {})})


# Sized so that all four cases finish in 2-4 minutes on a quiet 2-core CPU. The debug steps take
# milliseconds, so they get many repeats; the small MoE step takes seconds, so it gets few.
CASES = {
    c.name: c
    for c in (
        Case("debug-dense", "debug", moe=False, batch=8, seq=256, steps=30),
        Case("debug-moe", "debug", moe=True, batch=8, seq=256, steps=30),
        Case("small-dense", "small", moe=False, batch=4, seq=256, steps=6),
        Case("small-moe", "small", moe=True, batch=4, seq=256, steps=4),
    )
}


# ---- the two implementations ---------------------------------------------------------------------

def next_token_loss(logits_BTV: Tensor, ids_BT: Tensor) -> Tensor:
    """Cross-entropy of predicting token t+1 from tokens <= t; the same code for both models."""
    V = logits_BTV.shape[-1]
    return F.cross_entropy(logits_BTV[:, :-1].reshape(-1, V), ids_BT[:, 1:].reshape(-1))


def mujina_step(net: Transformer, ids_BT: Tensor) -> None:
    logits_BTV, aux = net(ids_BT, return_aux=True)
    loss = next_token_loss(logits_BTV, ids_BT)
    if aux is not None:
        loss = loss + aux.loss(net.cfg)  # balance + z-loss: the MoE trains with it
    loss.backward()
    net.zero_grad(set_to_none=True)


def transformers_step(model: nn.Module, ids_BT: Tensor) -> None:
    # use_cache=False as in any transformers training loop: otherwise every forward fills a KV cache.
    # Mixtral runs with output_router_logits=False (hf_config's default), so it computes no
    # load-balancing loss: transformers does slightly less work than mujina here, whose balance and
    # z-losses are included. They cost a softmax and a logsumexp over (B*T, E) per layer, well under 1%.
    logits_BTV = model(input_ids=ids_BT, use_cache=False).logits
    next_token_loss(logits_BTV, ids_BT).backward()
    model.zero_grad(set_to_none=True)


def build_pair(cfg: ModelConfig) -> tuple[Transformer, nn.Module]:
    """mujina's model and its transformers twin holding the same weights (through model.hf's export)."""
    torch.manual_seed(SEED)
    net = Transformer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "mujina", net)
        hf_dir = export_hf(ckpt, Path(tmp) / "hf")
        twin = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)  # float32, as exported
    return net.train(), twin.train()  # from_pretrained returns eval mode


@torch.no_grad()
def check_same_logits(net: Transformer, twin: nn.Module, ids_BT: Tensor) -> float:
    """Largest logit difference; refuses to time two models that do not compute the same function."""
    ours, theirs = net(ids_BT), twin(input_ids=ids_BT, use_cache=False).logits
    err = (ours - theirs).abs().max().item()
    if err > 1e-3:
        raise RuntimeError(
            f"mujina and transformers logits differ by {err:.2e}: the comparison would be meaningless; "
            "check model/hf.py's export against this transformers version"
        )
    return err


# ---- timing ----------------------------------------------------------------------------------------

def time_interleaved(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each step function, the functions alternating within every repeat."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()  # CPU execution is synchronous: no device sync needed
            step()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def run_case(case: Case, warmup: int) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    cfg = case.config()
    net, twin = build_pair(cfg)
    ids_BT = torch.randint(cfg.vocab_size, (case.batch, case.seq), generator=torch.Generator().manual_seed(SEED))
    logits_diff = check_same_logits(net, twin, ids_BT)

    seconds = time_interleaved(
        {"mujina": lambda: mujina_step(net, ids_BT), "transformers": lambda: transformers_step(twin, ids_BT)},
        warmup, case.steps,
    )
    tokens = case.batch * case.seq
    tok_s = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    best_tok_s = {name: tokens / min(s) for name, s in seconds.items()}  # least disturbed by other load
    return {
        "case": case.name,
        "preset": case.preset,
        "moe": MOE if case.moe else None,
        "batch": case.batch,
        "seq": case.seq,
        "warmup": warmup,
        "steps": case.steps,
        "params": cfg.num_params(),
        "active_params": cfg.num_active_params(),
        "logits_max_abs_diff": logits_diff,
        "transformers_class": type(twin).__name__,
        "transformers_attention": twin.config._attn_implementation,
        "transformers_experts": getattr(twin.config, "_experts_implementation", None) if case.moe else None,
        "mujina_tok_s": tok_s["mujina"],
        "transformers_tok_s": tok_s["transformers"],
        "ratio": tok_s["mujina"] / tok_s["transformers"],
        "mujina_best_tok_s": best_tok_s["mujina"],
        "transformers_best_tok_s": best_tok_s["transformers"],
        "load_avg_1m": [load_before, os.getloadavg()[0]],  # > threads: others competed for the CPU
        "mujina_step_s": seconds["mujina"],
        "transformers_step_s": seconds["transformers"],
    }


# ---- reporting ------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "device": "cpu",
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("case", "params", "mujina tok/s", "transformers tok/s", "ratio")
    lines = [
        (r["case"], f"{r['params'] / 1e6:.1f}M", f"{r['mujina_tok_s']:,.0f}", f"{r['transformers_tok_s']:,.0f}",
         f"{r['ratio']:.2f}")
        for r in rows
    ]
    widths = [max(len(str(col)) for col in column) for column in zip(header, *lines, strict=True)]
    fmt = lambda cells: " | ".join(  # text left, numbers right
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Forward+backward training throughput (tokens/s) on CPU of mujina's model against "
        "Hugging Face transformers' model of the same shape and weights. ratio = mujina / transformers; "
        ">= 1.0 means mujina trains at least as fast.",
        epilog="cases (batch x seq, timed steps): " + "; ".join(
            f"{c.name} ({c.batch}x{c.seq}, {c.steps})" for c in CASES.values()
        ),
    )
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated cases to run (default: all four)")
    p.add_argument("--steps", type=int, help="timed steps per implementation (default: per case, see below)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per implementation before timing (default: 2)")
    p.add_argument("--batch", type=int, help="sequences per step, for every case (default: per case)")
    p.add_argument("--seq", type=int,
                   help="tokens per sequence, for every case; at most the preset's max_seq_len (default: 256)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "model_throughput.json",
                   help="where to write the results; the directory is created "
                   "(default: benchmarks/results/model_throughput.json in the repository)")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        p.error(f"--cases: unknown case(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    for flag in ("steps", "batch", "seq"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")

    overrides = {k: getattr(args, k) for k in ("steps", "batch", "seq") if getattr(args, k) is not None}
    args.selected = [replace(CASES[n], **overrides) for n in names]
    for case in args.selected:
        limit = case.config().max_seq_len
        if case.seq < 2 or case.seq > limit:
            p.error(f"--seq {case.seq}: case {case.name} needs 2 <= seq <= max_seq_len={limit}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # keep the output readable; failures still raise
    transformers.logging.disable_progress_bar()
    rows = []
    for case in args.selected:
        print(f"running case {case.name} (batch {case.batch}, seq {case.seq}, {case.steps} steps) ...",
              file=sys.stderr, flush=True)
        rows.append(run_case(case, args.warmup))

    print(format_table(rows))
    print("ratio = mujina tok/s / transformers tok/s (>= 1.0: mujina trains at least as fast)")
    busiest = max(load for r in rows for load in r["load_avg_1m"])
    if busiest > torch.get_num_threads() + 1:  # this benchmark alone keeps `threads` cores busy
        print(f"warning: load average reached {busiest:.1f} with {torch.get_num_threads()} threads here: "
              "other processes competed for the CPU and the timings are noisy; re-run on a quiet machine")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

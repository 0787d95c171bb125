"""The swarm benchmark's training maths in one process, to rank settings cheaply before a real run.

    python benchmarks/swarm_sim.py [--layout coordinator] [--rounds 10 --inner-steps 40] [--outer-lr 0.7 ...]

Same dense model, upcycling, reference run, data split and evaluation as benchmarks/swarm_quality.py, but the
4 workers are `SwarmWorker`s in this process without hivemind, run one after another, and each module's Δ is
averaged exactly (token-weighted, among its holders, in fp32) before each holder's outer step: what the swarm
computes, less fp16 rounding of the averaged Δ. It reproduced swarm_quality.py's loss of the 2026-11-22
headline run (0.3163) to 4 digits. No bytes or timings: comm_reduction and utilization need the real run.

The dense checkpoint, the upcycled MoE and the reference's eval loss are cached under --cache (keyed by the
settings that determine them), so a probe after the first costs only the swarm's inner steps.
Each run appends one JSON line to --log.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.train import RunConfig, Trainer  # noqa: E402
from model.upcycle import upcycle  # noqa: E402

# "coordinator": coordinator.swarm_plan.plan_assignment's layout (what swarm_quality.py uses); "crossed": every
# pair of holders shares one expert (swarm_quality.py's layout before 2026-11-22: [[0,1],[2,3],[0,2],[1,3]]
# for 4 experts); "all": plain DiLoCo
LAYOUTS = ("coordinator", "crossed", "all")
CROSSED = {4: [[0, 1], [2, 3], [0, 2], [1, 3]], 8: [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 4, 5], [2, 3, 6, 7]]}


def main() -> None:
    from benchmarks.swarm_quality import CONTINUE_OPTIM, assignments, inner_optim
    from swarm.modules import tokens_per_module
    from swarm.round import SwarmWorker
    from swarm.settings import InnerConfig, SwarmSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense-steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="sequences per inner step per worker (reference: 4x)")
    p.add_argument("--num-experts", type=int, default=4, choices=sorted(CROSSED))
    p.add_argument("--layout", choices=LAYOUTS, default="coordinator")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--inner-lr", type=float, default=CONTINUE_OPTIM["lr"], help="min lr is a tenth of it")
    p.add_argument("--same-weight-decay", action="store_true", help="as in swarm_quality.py")
    p.add_argument("--noise-std", type=float, default=0.0, help="upcycling noise (reference and swarm)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path("/tmp/mujina_swarm_sim"))
    p.add_argument("--log", type=Path, help="append the result as a JSON line here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    E = a.num_experts
    layout = CROSSED[E] if a.layout == "crossed" else assignments("all" if a.layout == "all" else "half", E, 2)
    n, R, H, b = len(layout), a.rounds, a.inner_steps, a.batch
    data = {"source": "synthetic", "seq_len": 128}
    eval_cfg = {"eval_every": 0, "eval_batches": 8, "save_every": 0, "log_every": 100000}
    a.cache.mkdir(parents=True, exist_ok=True)

    dense_dir = a.cache / f"dense{a.dense_steps}"
    if not (dense_dir / "done").exists():
        final = Trainer(RunConfig.from_dict({
            "model": {"preset": "debug"}, "out": str(dense_dir), "data": data,
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30},
            "train": {"steps": a.dense_steps, "batch_size": 16, "micro_batch_size": 16, "seed": 0, **eval_cfg}})).run()
        (dense_dir / "done").write_text(str(final))
    moe_dir = a.cache / f"moe{a.dense_steps}_{E}_{a.noise_std}"
    if not moe_dir.exists():
        dense = load_checkpoint((dense_dir / "done").read_text())
        save_checkpoint(moe_dir, upcycle(dense, num_experts=E, top_k=2, noise_std=a.noise_std))
    run = a.cache / f"run{time.time_ns()}"

    def trainer(init: Path, steps: int, out: str) -> Trainer:
        return Trainer(RunConfig.from_dict({
            "init_from": str(init), "out": str(run / out), "data": data, "optim": CONTINUE_OPTIM,
            "train": {"steps": steps, "batch_size": n * b, "micro_batch_size": n * b, "seed": 1, **eval_cfg}}))

    ref_key = a.cache / f"ref_{moe_dir.name}_{R * H}_{n * b}.json"
    if not ref_key.exists():
        ref = trainer(moe_dir, R * H, "reference")
        ref.run()
        ref_key.write_text(json.dumps({"start": trainer(moe_dir, 1, "start").evaluate(), "ref": ref.evaluate()}))
    losses = json.loads(ref_key.read_text())

    layers = load_checkpoint(moe_dir).cfg.num_layers
    optim = dict(inner_optim(R, a.outer_lr, a.outer_momentum, not a.same_weight_decay), lr=a.inner_lr,
                 min_lr=a.inner_lr / 10)
    workers = [SwarmWorker(str(moe_dir), {i: experts for i in range(layers)}, SwarmSettings(run="sim", averaging=False),
                           InnerConfig(inner_steps=H, total_steps=R * H, batch_size=b, micro_batch_size=b, seq_len=128,
                                       data_seed=1, data_offset=w * b, optim=optim))
               for w, experts in enumerate(layout)]
    t = time.perf_counter()
    for r in range(R):
        deltas, weights = [], []
        for w in workers:
            w.model.train()
            tokens, counts_LE = 0, torch.zeros(layers, len(w.assignment[0]), dtype=torch.long)
            for s in range(H):
                _, k, c_LE = w.inner_step(r * H + s)
                tokens, counts_LE = tokens + k, counts_LE + c_LE
            deltas.append(w.outer.deltas())
            weights.append(tokens_per_module(tokens, counts_LE, w.assignment))
        for m in {m for d in deltas for m in d}:
            holders = [i for i in range(n) if m in deltas[i]]
            total = sum(max(weights[i][m], 1e-6) for i in holders)
            mean = sum(deltas[i][m] * max(weights[i][m], 1e-6) for i in holders) / total
            for i in holders:
                workers[i].outer.step(m, mean.clone(), a.outer_lr, a.outer_momentum)
    swarm_s = time.perf_counter() - t
    full = load_checkpoint(moe_dir)
    for w in reversed(workers):
        w.export_into(full, {})
    swarm_loss = trainer(save_checkpoint(run / "swarm", full), 1, "swarm_eval").evaluate()
    out = {"loss_ratio": swarm_loss / losses["ref"], "swarm_eval_loss": swarm_loss,
           "reference_eval_loss": losses["ref"], "start_eval_loss": losses["start"], "swarm_seconds": swarm_s,
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "layout": layout}
    print(json.dumps(out))
    if a.log:
        with a.log.open("a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()

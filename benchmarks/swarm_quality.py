"""Swarm training against the single-process reference, on the same tokens (the headline figure).

    python benchmarks/swarm_quality.py [--json PATH] [--rounds 10 --inner-steps 40]

1. train the `debug` dense model on the synthetic source, upcycle it to a 4-expert top-2 MoE;
2. (a) continue it with the reference trainer (model/train.py) for R·H steps of 4·b sequences;
   (b) continue it with 4 swarm workers on 127.0.0.1 (one process each, a real hivemind DHT and the ticketed exchange,
       a bootstrap DHT peer in this process as the coordinator would run), each holding the trunk and half
       of the experts (2 of 4 per layer, every expert held by 2 workers, laid out by the coordinator's
       plan_assignment: [0,1], [0,1], [2,3], [2,3]), for R rounds of H inner steps of b sequences, with the
       reference's AdamW schedule and its weight decay divided by the outer amplification (`inner_optim`).
       Worker w reads sequences [w·b, (w+1)·b) of every step, so together the workers see exactly the
       reference's batches;
3. evaluate both on the same held-out batches.

Figures (JSON keys):
    loss_ratio      swarm eval loss / reference eval loss (goal <= 1.03)
    comm_reduction  bytes a per-step data-parallel ring all-reduce of all parameters in fp32 would send per
                    worker (2·(n−1)/n · P · 4 bytes per step) / mean bytes each swarm worker sent (goal >= 100)
    utilization     mean over workers of time in inner steps / wall time of its rounds (goal >= 0.9)

Swarm bytes are the compressed sizes of what each peer sends in the ticketed exchange (its Δ of each
module to each other holder, swarm/exchange.py); DHT traffic (connectivity only) is left out. Four workers
share this machine's cores, so inner steps are slower than the reference's; utilization measures the time
lost to averaging (sending the Δs, waiting for the group's slowest member, CenteredClip), not the speed.
The workers get the tickets a coordinator would sign (swarm.ticket.round_tickets; weights: the tokens of
each round). `--byzantine KIND ...` adds one run per KIND with the last worker hostile (see make_hostile);
use it with `--experts all` so that every module has four holders.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.train import RunConfig, Trainer  # noqa: E402
from model.upcycle import upcycle  # noqa: E402

WORKERS = 4


def assignments(kind: str, num_experts: int, top_k: int) -> list[list[int]]:
    """Experts per worker (the same in every layer): half of them each, laid out as the coordinator lays them
    out (coordinator.swarm_plan.plan_assignment: holders of an expert hold the same experts, so every holder
    trains it beside the same others), or all of them (plain DiLoCo, to separate the cost of expert
    sharding from that of infrequent averaging)."""
    from coordinator.swarm_plan import plan_assignment

    if kind == "all":
        return [list(range(num_experts))] * WORKERS
    plan = plan_assignment({f"w{w}": num_experts // 2 for w in range(WORKERS)}, num_experts, top_k)
    return [plan.assignment[f"w{w}"] for w in range(WORKERS)]


CONTINUE_OPTIM = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.1)


def inner_optim(rounds: int, lr: float, mu: float, weight_decay_scale: bool) -> dict:
    """The workers' AdamW: the reference's, with its weight decay divided by the outer amplification as the
    coordinator does it (coordinator.swarm_plan.inner_weight_decay), unless `weight_decay_scale` is off."""
    from coordinator.swarm_plan import SwarmSection, inner_weight_decay

    if not weight_decay_scale:
        return CONTINUE_OPTIM
    s = SwarmSection(rounds=rounds, outer_lr=lr, outer_momentum=mu, weight_decay=CONTINUE_OPTIM["weight_decay"])
    return {**CONTINUE_OPTIM, "weight_decay": inner_weight_decay(s)}


HOSTILE = ("reversed", "scaled", "weight", "veto", "zero")


def make_hostile(exchange, kind: str) -> None:
    """Turn a worker's SwarmExchange into the attacker of `kind` (the last worker of a --byzantine run):
    reversed  sends −Δ (its honest norm, the other way)
    scaled    sends 9·Δ
    weight    sends −Δ and claims weight 1e6 in every message (what once set hivemind's average)
    veto      takes part in nothing: never sends (the old protocol's veto was one 'failed' report); the
              others aggregate three Δs, so its loss is also the three-honest-workers baseline
    zero      sends a Δ of zeros: no distance rule can tell it from an honest Δ (swarm/robust.py), it dilutes
              the average by its weight's share"""
    from hivemind.proto import averaging_pb2

    from swarm.exchange import SwarmExchange
    from swarm.outer import ModuleOutcome

    class Hostile(SwarmExchange):
        def average(self, round_, deltas):
            if kind == "veto":
                return {m: ModuleOutcome(m, "local", float(d.norm())) for m, d in deltas.items()}
            factor = {"scaled": 9.0, "zero": 0.0}.get(kind, -1.0)
            lie = {m: factor * d for m, d in deltas.items()}
            out = super().average(round_, lie)   # writes the group's aggregate into lie
            for m, d in deltas.items():   # it applies the aggregate as the others do: its next Δ looks honest
                d.copy_(lie[m])
            return out

        async def _send(self, peer, header, parts, deadline):
            if kind == "weight":
                real = averaging_pb2.AveragingData

                def claiming(*a, **kw):
                    return real(*a, **{**kw, "weight": 1e6})
                averaging_pb2.AveragingData = claiming
                try:
                    return await super()._send(peer, header, parts, deadline)
                finally:
                    averaging_pb2.AveragingData = real
            return await super()._send(peer, header, parts, deadline)

    exchange.__class__ = Hostile


def run_worker(spec_path: str) -> None:
    """One swarm worker (a subprocess): ready (prints its peer id) -> reads the members (slot -> peer id,
    modules, weight: what the coordinator's tickets would say) -> R rounds -> export its modules."""
    from swarm.round import SwarmWorker
    from swarm.settings import InnerConfig, SwarmSettings
    from swarm.ticket import round_tickets

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    layers = spec["layers"]
    assignment = {i: spec["experts"] for i in range(layers)}
    w = SwarmWorker(spec["checkpoint"], assignment, SwarmSettings(**spec["settings"]), InnerConfig(**spec["inner"]),
                    initial_peers=spec["peers"])
    if spec.get("hostile"):
        make_hostile(w.exchange, spec["hostile"])
    print("ready", w.peer_id, json.dumps(w.modules), flush=True)
    members = {slot: tuple(m) for slot, m in json.loads(sys.stdin.readline()).items()}
    me = next(slot for slot, m in members.items() if m[0] == w.peer_id)
    t0 = time.perf_counter()
    rounds = [w.run_round(r, ticket=round_tickets("bench", r, members, time.time() + 86400)[me])
              for r in range(spec["rounds"])]
    wall = time.perf_counter() - t0
    full = load_checkpoint(spec["checkpoint"])
    w.export_into(full, {})
    save_checkpoint(spec["out"], full)
    print(json.dumps({"rounds": rounds, "wall": wall}), flush=True)
    w.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the figures and settings here")
    p.add_argument("--dense-steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8, help="sequences per inner step per worker (reference: 4x); "
                   "until 2026-11-23 the default was 4, which gives the same loss ratio but 0.88 utilization")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--compression", default="fp16")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--experts", choices=["half", "all"], default="half", help="experts each worker holds")
    p.add_argument("--num-experts", type=int, default=4, help="experts per layer of the upcycled MoE (top-2)")
    p.add_argument("--same-weight-decay", action="store_true",
                   help="give the workers the reference's weight decay as is (default: divided by the outer step's "
                        "amplification, see inner_optim)")
    p.add_argument("--byzantine", nargs="*", default=[], choices=HOSTILE, metavar="KIND",
                   help=f"after the honest swarm run, one run per KIND ({', '.join(HOSTILE)}) with the last of the 4 "
                        "workers hostile; loss ratios are against the honest run. Use with --experts all, so every "
                        "module has 4 holders (2 holders cannot out-vote a liar)")
    p.add_argument("--averaging-timeout", type=float, default=20.0,
                   help="how long a member waits for the others' Δs (a silent 'veto' member costs this per round)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    import logging

    from swarm.processes import start_dht

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    E = args.num_experts
    layout = assignments(args.experts, E, 2)
    R, H, b, n = args.rounds, args.inner_steps, args.batch, len(layout)
    tmp = Path(tempfile.mkdtemp(prefix="swarm_quality_"))
    data = {"source": "synthetic", "seq_len": args.seq_len}
    eval_cfg = {"eval_every": 0, "eval_batches": 8, "save_every": 0, "log_every": 1000}

    t = time.perf_counter()
    dense = Trainer(RunConfig.from_dict({
        "model": {"preset": "debug"}, "out": str(tmp / "dense"), "data": data,
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30},
        "train": {"steps": args.dense_steps, "batch_size": 16, "micro_batch_size": 16, "seed": 0, **eval_cfg}}))
    final = dense.run()
    moe = upcycle(load_checkpoint(final), num_experts=E, top_k=2)
    ckpt = save_checkpoint(tmp / "moe", moe)
    dense_s = time.perf_counter() - t

    def trainer(init: Path, steps: int, out: str) -> Trainer:
        return Trainer(RunConfig.from_dict({
            "init_from": str(init), "out": str(tmp / out), "data": data, "optim": CONTINUE_OPTIM,
            "train": {"steps": steps, "batch_size": n * b, "micro_batch_size": n * b, "seed": 1, **eval_cfg}}))

    start_loss = trainer(ckpt, 1, "start").evaluate()
    t = time.perf_counter()
    ref = trainer(ckpt, R * H, "reference")
    torch.set_num_threads(2)
    ref.run()
    ref_s = time.perf_counter() - t
    ref_loss = ref.evaluate()

    # ---- swarm ----
    boot = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = [str(a) for a in boot.get_visible_maddrs()]
    layers = moe.cfg.num_layers
    settings = dict(run="bench", compression=args.compression, outer_lr=args.outer_lr,
                    outer_momentum=args.outer_momentum, averaging_timeout=args.averaging_timeout)
    worker_optim = inner_optim(R, args.outer_lr, args.outer_momentum, not args.same_weight_decay)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    weight = float(H * b * args.seq_len)   # the tokens each slot is leased per round: the ticket's weight

    def swarm(hostile: str | None) -> dict:
        """One swarm run (the last worker `hostile`, if given); its eval loss and per-worker results."""
        name = hostile or "honest"
        procs, t = [], time.perf_counter()
        for w, experts in enumerate(layout):
            spec = {"checkpoint": str(ckpt), "layers": layers, "experts": experts, "peers": peers,
                    "rounds": R, "out": str(tmp / f"{name}_worker{w}"), "settings": settings,
                    "hostile": hostile if w == n - 1 else None,
                    "inner": {"inner_steps": H, "total_steps": R * H, "batch_size": b, "micro_batch_size": b,
                              "seq_len": args.seq_len, "data_seed": 1, "data_offset": w * b, "optim": worker_optim}}
            (tmp / f"{name}_worker{w}.json").write_text(json.dumps(spec))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(tmp / f"{name}_worker{w}.json")],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        members = {}
        for w, proc in enumerate(procs):
            word, peer, modules = (proc.stdout.readline().strip().split(" ", 2) + ["", "", ""])[:3]
            if word != "ready":
                raise SystemExit("a swarm worker failed to start; see its stderr above")
            members[f"w{w}"] = (peer, json.loads(modules), weight)
        t = time.perf_counter()
        for proc in procs:
            proc.stdin.write(json.dumps(members) + "\n")
            proc.stdin.flush()
        results = [json.loads(proc.stdout.readline()) for proc in procs]
        for proc in procs:
            proc.wait()
        seconds = time.perf_counter() - t
        # assemble the swarm's model: the trunk from worker 0, each expert from its first holder (never the
        # hostile last worker: every module has an honest holder before it)
        full = load_checkpoint(ckpt)
        with torch.no_grad():
            for w, experts in reversed(list(enumerate(layout))):
                got = dict(load_checkpoint(tmp / f"{name}_worker{w}").named_parameters())
                for pname, param in full.named_parameters():
                    if "feed_forward" not in pname:
                        param.copy_(got[pname])
                    else:
                        for e in experts:
                            param[e].copy_(got[pname][e])
        loss = trainer(save_checkpoint(tmp / f"{name}_swarm", full), 1, f"{name}_eval").evaluate()
        return {"loss": loss, "results": results, "seconds": seconds, "full": full}

    honest = swarm(None)
    swarm_s, results, swarm_loss, full = honest["seconds"], honest["results"], honest["loss"], honest["full"]
    attacked = {kind: swarm(kind) for kind in args.byzantine}
    boot.shutdown()

    P = sum(q.numel() for q in full.parameters())
    dp_bytes = R * H * 2 * (n - 1) / n * P * 4
    sent = [sum(r["bytes_sent"] for r in res["rounds"]) for res in results]
    util = [sum(r["inner_seconds"] for r in res["rounds"]) / res["wall"] for res in results]
    # where each worker's time outside its inner steps went, per round (medians over rounds, then workers)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    overhead = {key: med([med([r[key] for r in res["rounds"]]) for res in results])
                for key in ("allreduce_seconds", "aggregate_seconds")}
    overhead["round_minus_inner_seconds"] = med([med([r["round_seconds"] - r["inner_seconds"] for r in res["rounds"]])
                                                 for res in results])
    overhead["inner_seconds"] = med([med([r["inner_seconds"] for r in res["rounds"]]) for res in results])
    failed = sum(r["modules_failed"] + r["modules_refused"] for res in results for r in res["rounds"])
    round_s = med([med([r["round_seconds"] for r in res["rounds"]]) for res in results])
    # the defences' cost in the honest run: CenteredClip and the receiver's checks of each Δ (the checks are
    # part of the transfer; CenteredClip is timed alone), as a share of the round
    defence_share = overhead["aggregate_seconds"] / round_s
    byzantine = {}
    for kind, run in attacked.items():
        honest_workers = run["results"][:-1]
        byzantine[kind] = {
            "eval_loss": run["loss"], "loss_ratio_vs_honest": run["loss"] / swarm_loss,
            "round_seconds_median": med([med([r["round_seconds"] for r in res["rounds"]]) for res in honest_workers]),
            "seconds": run["seconds"],
            "honest_modules_failed": sum(r["modules_failed"] for res in honest_workers for r in res["rounds"]),
        }
    figures = {
        "loss_ratio": swarm_loss / ref_loss,
        "comm_reduction": dp_bytes / (sum(sent) / n),
        "utilization": sum(util) / n,
    }
    detail = {
        "start_eval_loss": start_loss, "reference_eval_loss": ref_loss, "swarm_eval_loss": swarm_loss,
        "swarm_last_inner_loss": [res["rounds"][-1]["loss_last"] for res in results],
        "bytes_sent_per_worker": sent, "dp_bytes_per_worker": dp_bytes, "utilization_per_worker": util,
        "module_averagings_failed_or_refused": failed, "params": P, "per_round_median": overhead,
        "seconds": {"dense_and_upcycle": dense_s, "reference": ref_s, "swarm": swarm_s},
        "round_seconds_median": round_s, "defence_share_of_round": defence_share, "byzantine": byzantine,
    }
    settings_used = {"model": f"debug dense (164k params) -> {E} experts top-2 MoE", "dense_steps": args.dense_steps,
                     "rounds": R, "inner_steps": H, "workers": n, "experts_per_worker": layout,
                     "batch_per_worker": b, "reference_batch": n * b, "seq_len": args.seq_len,
                     "tokens_each": R * H * n * b * args.seq_len, "reference_optim": CONTINUE_OPTIM,
                     "inner_optim": worker_optim,
                     "outer": f"Nesterov SGD lr {args.outer_lr} momentum {args.outer_momentum}",
                     "compression": args.compression, "averaging_timeout": args.averaging_timeout,
                     "byzantine": args.byzantine,
                     "machine_cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    print("\nsettings:", json.dumps(settings_used))
    print(f"\n{'':24s}{'reference':>12s}{'swarm':>12s}")
    label = f"eval loss (start {start_loss:.4f})"
    print(f"{label:24s}{ref_loss:12.4f}{swarm_loss:12.4f}")
    print(f"{'seconds':24s}{ref_s:12.1f}{swarm_s:12.1f}")
    print(f"{'bytes sent / worker':24s}{dp_bytes:12.3g}{sum(sent) / n:12.3g}")
    print("per round (medians): " + ", ".join(f"{k.removesuffix('_seconds')} {v:.3f} s" for k, v in overhead.items()))
    print(f"\n{'figure':16s}{'value':>10s}{'goal':>10s}")
    for key, goal in (("loss_ratio", "<= 1.03"), ("comm_reduction", ">= 100"), ("utilization", ">= 0.9")):
        print(f"{key:16s}{figures[key]:10.3f}{goal:>10s}")
    print(f"{'defence share':16s}{defence_share:10.4f}{'<= 0.05':>10s}   (CenteredClip / round time, honest run)")
    if byzantine:
        print(f"\n{'one hostile of 4':18s}{'eval loss':>10s}{'vs honest':>10s}{'goal':>8s}{'round s':>9s}"
              f"{'honest failed':>15s}")
        print(f"{'none (honest)':18s}{swarm_loss:10.4f}{1.0:10.4f}{'':>8s}{round_s:9.2f}{'':>15s}")
        for kind, row in byzantine.items():
            print(f"{kind:18s}{row['eval_loss']:10.4f}{row['loss_ratio_vs_honest']:10.4f}{'<= 1.01':>8s}"
                  f"{row['round_seconds_median']:9.2f}{int(row['honest_modules_failed']):15d}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**figures, "detail": detail, "settings": settings_used}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""How far apart hivemind leaves the holders of one module, and what the agreement check costs.

    python benchmarks/swarm_agreement.py [--json PATH] [--size 300000] [--compressions none fp16 8bit]

Three `SwarmAverager` peers on 127.0.0.1 (real hivemind DHT and averagers) average one module of `--size`
floats: Δ_p = common + Student-t(3) noise, weights 1, 2, 3. Per compression, the figures (JSON keys):

    outcomes        each peer's ModuleOutcome ("ok", or "mismatch" where parts were lost)
    bit_identical   whether all holders' Δ̄ are equal bit for bit
    max_abs_diff    max over holder pairs of max |Δ̄_p − Δ̄_q|
    rel_l2_diff     max over holder pairs of ‖Δ̄_p − Δ̄_q‖ / ‖Δ̄_p‖
    sketch_margin   max over pairs and projections of |proj_p − proj_q| / (tol_p + tol_q); a mismatch is
                    declared above SKETCH_SIGMAS (10)

and, without the network, `sketch_seconds_per_million`: the time `agreement_sketch` takes per 10^6 floats
(one thread). The figures of holders that did not agree (outcome "mismatch") are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import swarm.averager as averager_module  # noqa: E402
from swarm.agreement import SKETCH_PROJECTIONS, agreement_sketch  # noqa: E402
from swarm.averager import SwarmAverager  # noqa: E402
from swarm.settings import COMPRESSIONS, SwarmSettings  # noqa: E402


def average_once(compression: str, size: int) -> dict:
    s = SwarmSettings(run=f"agree-{compression}", compression=compression, matchmaking_time=3.0,
                      request_timeout=1.0, averaging_timeout=60.0, stats_timeout=8.0)
    first = SwarmAverager(s, {"m": size}, expected_holders={"m": 3})
    peers = [first] + [SwarmAverager(s, {"m": size}, initial_peers=first.visible_maddrs(),
                                     expected_holders={"m": 3}) for _ in range(2)]
    sketches: dict[str, dict] = {}
    compute = averager_module.agreement_sketch

    def recording_sketch(averaged, local, comp):  # keep each peer's sketch (one thread per peer)
        out = compute(averaged, local, comp)
        sketches[threading.current_thread().name] = out
        return out

    averager_module.agreement_sketch = recording_sketch  # what SwarmAverager calls
    try:
        torch.manual_seed(0)
        common = torch.randn(size) * 1e-4
        deltas = [common + torch.distributions.StudentT(3.0).sample((size,)) * 5e-5 for _ in range(3)]
        given = [{"m": d.clone()} for d in deltas]
        outcomes: list = [None] * 3

        def go(i):
            outcomes[i] = peers[i].average(0, given[i], {"m": float(i + 1)})["m"].outcome

        threads = [threading.Thread(target=go, args=(i,), name=f"peer{i}") for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        averager_module.agreement_sketch = compute
        for p in peers:
            p.shutdown()
    row: dict = {"compression": compression, "outcomes": outcomes}
    ok = [i for i in range(3) if outcomes[i] == "ok"]
    pairs = [(i, j) for i in ok for j in ok if i < j]
    if pairs:
        r = [given[i]["m"] for i in range(3)]
        row["bit_identical"] = all(torch.equal(r[i], r[j]) for i, j in pairs)
        row["max_abs_diff"] = max(float((r[i] - r[j]).abs().max()) for i, j in pairs)
        row["rel_l2_diff"] = max(float((r[i] - r[j]).norm() / r[i].norm()) for i, j in pairs)
        margins = []
        for i, j in pairs:
            a, b = sketches[f"peer{i}"], sketches[f"peer{j}"]
            margins += [abs(x - y) / (a["tol"][k // SKETCH_PROJECTIONS] + b["tol"][k // SKETCH_PROJECTIONS])
                        for k, (x, y) in enumerate(zip(a["proj"], b["proj"], strict=True))]
        row["sketch_margin"] = max(margins)
    return row


def sketch_cost(size: int = 4_000_000, repeats: int = 3) -> float:
    torch.manual_seed(0)
    local, averaged = torch.randn(size), torch.randn(size)
    agreement_sketch(averaged, local, "fp16")  # builds the cached signs
    t0 = time.perf_counter()
    for _ in range(repeats):
        agreement_sketch(averaged, local, "fp16")
    return (time.perf_counter() - t0) / repeats / (size / 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--size", type=int, default=300_000, help="floats in the averaged module")
    p.add_argument("--compressions", nargs="+", default=["none", "fp16", "8bit"], choices=COMPRESSIONS)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [average_once(c, args.size) for c in args.compressions]
    seconds = sketch_cost()
    print(f"\n{'compression':12s}{'outcomes':>28s}{'bit-identical':>15s}{'max|diff|':>12s}{'rel L2':>10s}"
          f"{'margin':>8s}")
    for row in rows:
        cells = [f"{str(row[k]):>15}" if k == "bit_identical" else f"{row[k]:>{w}.2g}"
                 for k, w in (("bit_identical", 15), ("max_abs_diff", 12), ("rel_l2_diff", 10), ("sketch_margin", 8))
                 ] if "max_abs_diff" in row else ["   (no holders agreed on a full average)"]
        print(f"{row['compression']:12s}{','.join(row['outcomes']):>28s}" + "".join(cells))
    print(f"\nagreement_sketch: {seconds:.3f} s per million floats (one thread)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": args.size, "rows": rows, "sketch_seconds_per_million": seconds},
                                        indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

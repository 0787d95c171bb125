"""The coordinator's side of swarm training: settings, expert assignment, round tasks, validation, the full copy.

    mujina-coordinator init-swarm --config project.yaml --checkpoint UPCYCLED_MOE

copies the upcycled checkpoint to `STATE_DIR/checkpoints/{run}/round_000000/` (the project checkpoint
format plus `outer_momentum.safetensors`, zeros) and records the run in `STATE_DIR/swarm/{run}.json`.
While `serve` runs, `SwarmDriver` then, once per round:

1. plans the expert assignment from the registered workers' memory (`plan_assignment`: every worker holds
   the trunk and as many experts as its budget fits, experts with the fewest holders first, so each gets
   >= `replication` holders where the workers allow; an expert nobody holds stays frozen, is logged and
   shown by the `mujina_swarm_expert_holders` gauge as 0). Only live workers get a slot: those seen
   (heartbeat or lease request) within `SwarmDriver.live_window_s`;
2. adds one `train` task per slot (payload: round, checkpoint, assignment, settings, inner loop, expected
   holders per module). Any live worker may lease a slot's task: one that cannot hold its assignment (the
   memory model against its budget) gives it back for another (worker/executors/train.py). With `swarm.shards` set, each
   task's inner loop carries a *lease* (data_shards/lease.py): a disjoint range of the shard corpus that
   packs into exactly inner_steps · batch_size sequences; leases advance round by round through the
   corpus (the cursor is kept in the status file), wrapping into a new epoch with a new shard order. The
   shard files are served as shards/swarm-{run}/ (`publish_shards`). The validator refuses a result that
   claims more tokens than its lease holds; credit is the tokens trained;
3. when every task of the round is done (or dead), merges the uploaded module states into its full copy
   (each holder uploads its modules' parameters and outer momentum, safetensors), writes
   `round_{r+1}` every `checkpoint_every` rounds (and always `latest/`), served by FetchCheckpoint so a
   newcomer starts from the current round, momentum included.

The bootstrap DHT peer runs in the coordinator's process (`start_bootstrap_dht`); its multiaddrs are
added to RegisterResponse.bootstrap_peers.

Importing this module stays free of torch and hivemind (the coordinator starts without them); the
functions that touch tensors import them when called.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .validate import Credit, ValidationError, Validator, finite_number, register

log = logging.getLogger(__name__)


class SwarmSection(BaseModel):
    """The `swarm` section of project.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inner_steps: int = Field(100, ge=1, description="H: inner AdamW steps per round")
    rounds: int = Field(100, ge=1, description="rounds in the run")
    batch_size: int = Field(8, ge=1, description="sequences per inner step on each worker")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward on a worker")
    seq_len: int = Field(128, ge=2, description="tokens per sequence")
    data_seed: int = Field(0, description="seed of the synthetic data stream, or of the shard order of each epoch")
    inner_lr: float = Field(1e-3, gt=0, description="peak inner AdamW learning rate")
    inner_min_lr: float = Field(1e-4, ge=0, description="inner learning rate at the end of the cosine decay")
    inner_warmup_steps: int = Field(10, ge=0, description="inner warmup steps (counted over the whole run)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay per token, as in single-process "
                                "training; workers apply it divided by the outer step's amplification "
                                "(`inner_weight_decay`)")
    outer_lr: float = Field(0.7, gt=0, description="outer Nesterov SGD learning rate (DiLoCo: 0.7)")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="outer Nesterov momentum (DiLoCo: 0.9)")
    compression: Literal["fp16", "8bit", "none"] = Field("fp16", description="how Δ travels")
    matchmaking_time: float = Field(5.0, gt=0, description="seconds a group leader waits for peers")
    averaging_timeout: float = Field(60.0, gt=0, description="the most a peer dying mid-round delays the others: "
                                     "each all-reduce gets about a third of it, the wait for reports and a second "
                                     "attempt the rest (worker/swarm.py, Faults)")
    failure_policy: Literal["retry", "local"] = Field("retry", description="a module whose group fails: retry "
                                                      "(carry its Δ to the next round) or local (apply it alone)")
    outlier_factor: float = Field(10.0, gt=1, description="refuse a Δ whose norm exceeds this × the median")
    replication: int = Field(2, ge=1, description="holders wanted per expert")
    checkpoint_every: int = Field(10, ge=1, description="K: write a round checkpoint every K rounds")
    workers: int = Field(2, ge=1, description="train slots per round when no worker has registered yet")
    memory_budget_bytes: int = Field(8 * 2**30, ge=0, description="memory budget of a worker that reports none")
    shards: Path | None = Field(None, description="a shard directory (`mujina-data shard` output: manifest.json + "
                                "shards) the rounds train on, relative to the project file; each train task gets a "
                                "disjoint lease of it. Unset: the built-in synthetic arithmetic data")

    @model_validator(mode="after")
    def _checks(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"swarm.batch_size ({self.batch_size}) must be a multiple of swarm.micro_batch_size "
                             f"({self.micro_batch_size})")
        if self.inner_min_lr > self.inner_lr:
            raise ValueError("swarm.inner_min_lr must not exceed swarm.inner_lr")
        from worker.swarm import SwarmSettings

        SwarmSettings(**worker_settings(self, "check"))  # the workers' timeouts fit averaging_timeout
        return self


def outer_amplification(rounds: int, lr: float, mu: float) -> float:
    """How much the outer Nesterov step multiplies a Δ that is the same every round, averaged over the run:
    round k steps lr·(1 + μ·(1 − μ^(k+1))/(1 − μ))·Δ (1.33 in round 0, up to lr/(1 − μ) = 7 for 0.7/0.9)."""
    return sum(lr * (1 + mu * (1 - mu ** (k + 1)) / (1 - mu)) for k in range(rounds)) / rounds


def inner_weight_decay(s: SwarmSection) -> float:
    """The workers' AdamW weight decay: `weight_decay` divided by the outer amplification. Decay is part of
    each worker's Δ and, unlike the gradients' noise, does not shrink when holders average their Δs; the outer
    step then multiplies it, so with the single-process decay a swarm would shrink weights about 3x faster per
    token (benchmarks/swarm_quality.py: loss ratio 1.034 instead of 1.028)."""
    return s.weight_decay / outer_amplification(s.rounds, s.outer_lr, s.outer_momentum)


# ---- assignment ----------------------------------------------------------------------------------

@dataclass
class Plan:
    assignment: dict[str, list[int]]     # slot (worker id) -> experts held, the same in every layer
    holders: dict[int, int]              # expert -> number of holders
    frozen: list[int]                    # experts nobody holds this round


def plan_assignment(capacities: dict[str, int], num_experts: int, top_k: int, replication: int = 2,
                    previous: dict[str, list[int]] | None = None) -> Plan:
    """Give each worker min(capacity, E) experts, experts with the fewest holders first.

    Slots are filled one at a time across workers (round-robin), so every expert gets a first holder
    before any gets a second; ties prefer what a worker held last round (`previous`), so a join or a
    leave moves as few experts as possible. Workers whose capacity is below top_k hold nothing."""
    previous = previous or {}
    cap = {w: min(c, num_experts) for w, c in capacities.items() if c >= top_k}
    held: dict[str, list[int]] = {w: [] for w in cap}
    count = [0] * num_experts
    for slot in range(max(cap.values(), default=0)):
        for w in sorted(cap, key=lambda w: (-cap[w], w)):
            if slot >= cap[w]:
                continue
            before = set(previous.get(w, ()))
            e = min((e for e in range(num_experts) if e not in held[w]),
                    key=lambda e: (min(count[e], replication), e not in before, count[e], e))
            held[w].append(e)
            count[e] += 1
    frozen = [e for e in range(num_experts) if count[e] == 0]
    short = [e for e in range(num_experts) if 0 < count[e] < replication]
    if frozen:
        log.warning("experts %s have no holder this round: they stay frozen (add workers or memory)", frozen)
    if short:
        log.info("experts %s have fewer than %d holders", short, replication)
    return Plan({w: sorted(v) for w, v in held.items()}, dict(enumerate(count)), frozen)


def worker_budget(capabilities: dict, default: int) -> int:
    """A worker's memory for a round: its largest accelerator, else its host memory, else the default."""
    accel = [d.get("memory_bytes", 0) for d in capabilities.get("devices", []) if d.get("kind") in ("cuda", "mps")]
    return max(accel, default=0) or int(capabilities.get("host_memory_bytes") or 0) or default


# ---- tasks and validation ------------------------------------------------------------------------

def expected_holders(assignment: dict[str, list[int]], num_layers: int) -> dict[str, int]:
    out = {"trunk": len(assignment)}
    for experts in assignment.values():
        for e in experts:
            for i in range(num_layers):
                out[f"l{i}e{e}"] = out.get(f"l{i}e{e}", 0) + 1
    return out


def worker_settings(s: SwarmSection, run: str) -> dict:
    """The `worker.swarm.SwarmSettings` of every train task of the run."""
    return {"run": run, "outer_lr": s.outer_lr, "outer_momentum": s.outer_momentum, "compression": s.compression,
            "matchmaking_time": s.matchmaking_time, "request_timeout": min(3.0, s.matchmaking_time / 2),
            "averaging_timeout": s.averaging_timeout, "stats_timeout": max(2.0, s.averaging_timeout / 10),
            "failure_policy": s.failure_policy, "outlier_factor": s.outlier_factor}


def round_payloads(s: SwarmSection, run: str, round_: int, checkpoint: str, plan: Plan, num_layers: int,
                   leases: list[dict] | None = None, shards_at: str | None = None) -> list[dict]:
    """One `train` payload per slot (slots in sorted order). With `leases` (one per slot, `Lease.to_dict()`),
    slot i trains on leases[i], its shards fetched as shards/{shards_at}/FILE; without, on the synthetic
    stream, reading sequence indices [i·B, (i+1)·B) of every inner step."""
    holders = expected_holders(plan.assignment, num_layers)
    settings = worker_settings(s, run)
    if leases is not None and len(leases) != len(plan.assignment):
        raise ValueError(f"{len(leases)} leases for {len(plan.assignment)} slots")
    out = []
    for i, (slot, experts) in enumerate(sorted(plan.assignment.items())):
        inner = {"inner_steps": s.inner_steps, "total_steps": s.rounds * s.inner_steps, "batch_size": s.batch_size,
                 "micro_batch_size": s.micro_batch_size, "seq_len": s.seq_len, "data_seed": s.data_seed,
                 "data_offset": i * s.batch_size,
                 "optim": {"lr": s.inner_lr, "min_lr": s.inner_min_lr, "warmup_steps": s.inner_warmup_steps,
                           "weight_decay": inner_weight_decay(s)}}
        if leases is not None:
            inner.update(data_source="shards", data_offset=0, lease=leases[i], shards_at=shards_at)
        out.append({"round": round_, "checkpoint": checkpoint, "slot": slot,
                    "assignment": {str(layer): experts for layer in range(num_layers)},
                    "settings": settings, "inner": inner, "expected_holders": holders})
    return out


@register("train")
class TrainValidator(Validator):
    """A worker reports one swarm round.

    payload: as built by `round_payloads`. metrics: loss (finite, >= 0), tokens (whole, 0 < T <= inner_steps ·
    batch_size · seq_len, and with a shard lease T <= the lease's tokens: a worker cannot claim more data than
    it was given), delta_norm_trunk and delta_norm_max (finite, >= 0: a worker whose Δ was refused reports the
    norms of the modules it kept, and modules_refused). Credit: 1 task and T tokens_trained."""

    def check_payload(self, payload: dict) -> None:
        for key in ("round", "checkpoint", "assignment", "settings", "inner"):
            if key not in payload:
                raise ValidationError(f"train payload.{key} is missing")
        if not isinstance(payload["round"], int) or payload["round"] < 0:
            raise ValidationError("train payload.round must be a non-negative integer")
        inner = payload["inner"]
        for key in ("inner_steps", "batch_size", "seq_len"):
            if not isinstance(inner.get(key), int) or inner[key] < 1:
                raise ValidationError(f"train payload.inner.{key} must be a positive integer")
        if "lease" in inner:
            from data_shards.lease import Lease

            try:
                lease = Lease.from_dict(inner["lease"])
            except ValueError as e:
                raise ValidationError(f"train payload.inner.lease: {e}") from None
            if lease.sequences != inner["inner_steps"] * inner["batch_size"] or lease.seq_len != inner["seq_len"]:
                raise ValidationError("train payload.inner.lease must hold inner_steps · batch_size sequences of "
                                      "seq_len tokens")

    def check_result(self, payload: dict, metrics: dict[str, float], elapsed_s: float,
                     data: bytes = b"") -> list[Credit]:
        finite_number(metrics, "loss")
        for key in ("delta_norm_trunk", "delta_norm_max"):
            finite_number(metrics, key)
        tokens = finite_number(metrics, "tokens")
        inner = payload["inner"]
        lease = inner["inner_steps"] * inner["batch_size"] * inner["seq_len"]
        what = "inner_steps · batch_size · seq_len"
        if "lease" in inner:
            lease, what = min(lease, int(inner["lease"]["tokens"])), "the tokens of the leased shard range"
        if tokens != int(tokens) or not 0 < tokens <= lease:
            raise ValidationError(f"metrics.tokens ({tokens!r}) must be a whole number in (0, {lease}] ({what})")
        return [Credit("tasks", 1), Credit("tokens_trained", tokens)]


# ---- the full copy -------------------------------------------------------------------------------

def round_name(run: str, round_: int) -> str:
    return f"{run}/round_{round_:06d}"


def init_swarm(state_dir: Path, run: str, checkpoint: Path) -> str:
    """Start a swarm run from an upcycled MoE checkpoint; returns the round-0 checkpoint name."""
    from model.checkpoint import load_checkpoint
    from worker.swarm import save_round_checkpoint

    net = load_checkpoint(checkpoint)  # validates the directory
    if net.cfg.moe is None:
        raise ValueError(f"{checkpoint} is a dense model: upcycle it first (mujina-model upcycle --checkpoint "
                         f"{checkpoint} --experts 8 --top-k 2 --out MOE)")
    status_path = Path(state_dir) / "swarm" / f"{run}.json"
    if status_path.exists():
        raise ValueError(f"{status_path} exists: run {run!r} is already a swarm run; pick another run name")
    name = round_name(run, 0)
    save_round_checkpoint(Path(state_dir) / "checkpoints" / name, net, {}, 0)
    status_path.parent.mkdir(parents=True, exist_ok=True)
    status_path.write_text(json.dumps({"round": 0, "checkpoint": name, "assignment": {}, "tasks": [],
                                       "num_layers": net.cfg.num_layers, "num_experts": net.cfg.moe.num_experts},
                                      indent=2))
    return name


def read_status(state_dir: Path, run: str) -> dict | None:
    """The run's swarm status (STATE_DIR/swarm/{run}.json), or None when it is not a swarm run (yet)."""
    path = Path(state_dir) / "swarm" / f"{run}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def expert_holders(state_dir: Path, run: str, names: dict[str, str] | None = None) -> list[dict]:
    """Every (layer, expert) of the current round with the workers that hold it (names where known):
    rows {run, layer, expert, holders}; an expert nobody holds has holders [] (frozen). Read by the status
    page and the mujina_swarm_expert_holders gauge; no torch."""
    status = read_status(state_dir, run)
    if not status or "num_layers" not in status:
        return []
    names = names or {}
    by_expert: dict[int, list[str]] = {e: [] for e in range(status["num_experts"])}
    for slot, experts in sorted(status.get("assignment", {}).items()):
        for e in experts:
            by_expert[e].append(names.get(slot, slot))
    return [{"run": run, "layer": layer, "expert": e, "holders": by_expert[e]}
            for layer in range(status["num_layers"]) for e in sorted(by_expert)]


def merge_uploads(full, momentum_full: dict, uploads: list[bytes]) -> set[str]:
    """Write uploaded modules into the full copy (later uploads win for modules several workers hold; they
    agree to the compression's rounding). Returns the modules updated; the others stay as they were."""
    from safetensors.torch import load

    from worker.swarm import module_tensors, momentum_into, momentum_views, unflatten_into

    if not momentum_full:
        momentum_into(momentum_full, full, {})
    done = set()
    for data in uploads:
        tensors = load(data)  # safetensors: no code runs while reading
        for key, flat in tensors.items():
            module, _, what = key.rpartition(".")
            target = module_tensors(full, module) if what == "theta" else momentum_views(momentum_full, full, module)
            if flat.numel() != sum(t.numel() for t in target) or not bool(flat.isfinite().all()):
                log.warning("upload for module %s has the wrong size or non-finite values; ignored", module)
                continue
            unflatten_into(flat, target)
            done.add(module)
    return done


def start_bootstrap_dht(host: str = "0.0.0.0", port: int = 0):
    """The swarm's bootstrap DHT peer, run by the coordinator; returns (dht, multiaddrs to hand out)."""
    from worker.swarm import start_dht

    dht = start_dht(host_maddrs=[f"/ip4/{host}/tcp/{port}"])  # a fork()ed child of this gRPC server's process
    return dht, [str(a) for a in dht.get_visible_maddrs()]


def publish_shards(directory: Path, state_dir: Path, name: str) -> str:
    """Make a shard directory's files fetchable (FetchShard serves STATE_DIR/shards/...); returns the name of
    the directory under shards/. A directory already inside STATE_DIR/shards is served in place; any other is
    hard-linked (copied across file systems) into shards/{name}/, file by file; shard files are named by
    their content, so a file already there is kept."""
    import os

    from data_shards.shards import MANIFEST, Manifest

    base = (state_dir / "shards").resolve()
    src = directory.resolve()
    if src.is_relative_to(base) and src != base:
        return src.relative_to(base).as_posix()
    dest = base / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in [s.file for s in Manifest.load(src).shards] + [MANIFEST]:
        target = dest / f
        if f != MANIFEST and target.exists() and target.stat().st_size == (src / f).stat().st_size:
            continue
        tmp = dest / f".{f}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src / f, tmp)
        except OSError:
            shutil.copyfile(src / f, tmp)
        os.replace(tmp, target)
    return name


class SwarmDriver:
    """Advances a swarm run round by round from inside `serve` (a thread polling the store)."""

    def __init__(self, cfg, store, scheduler, poll_s: float = 1.0):
        self.cfg, self.store, self.scheduler, self.s = cfg, store, scheduler, cfg.swarm
        self.poll_s = poll_s
        self._corpus_at = None  # (data_shards.lease.Corpus, its directory under shards/), opened on first use
        self.status_path = Path(cfg.state_dir) / "swarm" / f"{cfg.run}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="swarm-driver", daemon=True)

    def start(self) -> SwarmDriver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.step()
            except Exception:
                log.exception("swarm driver step failed; retrying in %.1f s", self.poll_s)

    def _status(self) -> dict:
        return json.loads(self.status_path.read_text())

    def _write_status(self, status: dict) -> None:
        from model.checkpoint import write_json

        write_json(self.status_path, status)

    def live_window_s(self) -> float:
        """A worker last seen longer ago than this has left: its leases would have expired (leases.duration_s),
        and an idle daemon asks for work every limits.no_work_retry_s."""
        return max(self.cfg.leases.duration_s, 2 * self.cfg.limits.no_work_retry_s)

    def _capacities(self) -> dict[str, int]:
        """Experts each live worker that runs train tasks can hold this round (workers seen within
        `live_window_s`; a worker that registered without saying its kinds counts as one)."""
        import time

        from sqlalchemy import select

        from model.checkpoint import load_config
        from worker.memory import experts_that_fit

        from . import store as S

        status = self._status()
        mcfg = load_config(Path(self.cfg.state_dir) / "checkpoints" / status["checkpoint"])
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(S.workers.c.id, S.workers.c.capabilities).where(
                S.workers.c.last_seen >= time.time() - self.live_window_s())).all()
        kw = dict(micro_batch_size=self.s.micro_batch_size, seq_len=self.s.seq_len)
        caps = {}
        for wid, capabilities in rows:
            capabilities = json.loads(capabilities)
            if capabilities.get("kinds") and "train" not in capabilities["kinds"]:
                continue  # it said which kinds it runs, and train is not one of them
            budget = worker_budget(capabilities, self.s.memory_budget_bytes)
            caps[wid] = experts_that_fit(mcfg, budget, **kw)
        if not caps:
            caps = {f"slot{i}": experts_that_fit(mcfg, self.s.memory_budget_bytes, **kw) for i in range(self.s.workers)}
        return caps

    def _corpus(self, vocab_size: int):
        """The swarm's shard corpus (opened once) and where the coordinator serves it under shards/."""
        if self._corpus_at is None:
            from data_shards.lease import Corpus

            corpus = Corpus.open(self.s.shards, self.s.data_seed)
            if corpus.manifest.vocab_size > vocab_size:
                raise ValueError(f"swarm.shards {self.s.shards} were made with a {corpus.manifest.vocab_size}-piece "
                                 f"tokenizer but the model's vocab_size is {vocab_size}: use the model's tokenizer")
            at = publish_shards(Path(self.s.shards), Path(self.cfg.state_dir), f"swarm-{self.cfg.run}")
            log.info("swarm data: %d shards, %d documents, %d tokens in %s, served as shards/%s/",
                     len(corpus.manifest.shards), corpus.manifest.documents, corpus.manifest.tokens, self.s.shards, at)
            self._corpus_at = (corpus, at)
        return self._corpus_at

    def step(self) -> None:
        """Add the current round's tasks if it has none; close the round once all of them finished."""
        if not self.status_path.exists():
            return
        status = self._status()
        if status["round"] >= self.s.rounds:
            return
        if not status["tasks"]:
            self._open_round(status)
            return
        states = self._task_states(status["tasks"])
        if all(st in ("done", "dead") for st in states.values()):
            self._close_round(status)

    def _task_states(self, ids: list[str]) -> dict[str, str]:
        from sqlalchemy import select

        from . import store as S

        with self.store.engine.connect() as conn:
            return dict(conn.execute(select(S.tasks.c.id, S.tasks.c.state).where(S.tasks.c.id.in_(ids))).all())

    def _open_round(self, status: dict) -> None:
        from model.checkpoint import load_config

        mcfg = load_config(Path(self.cfg.state_dir) / "checkpoints" / status["checkpoint"])
        plan = plan_assignment(self._capacities(), mcfg.moe.num_experts, mcfg.moe.top_k, self.s.replication,
                               status.get("assignment"))
        leases = shards_at = None
        if self.s.shards is not None:
            from data_shards.lease import Cursor

            corpus, shards_at = self._corpus(mcfg.vocab_size)
            planned, cursor = corpus.plan(Cursor(**status.get("data_cursor", {})), len(plan.assignment),
                                          self.s.inner_steps * self.s.batch_size, self.s.seq_len)
            leases = [lease.to_dict() for lease in planned]
            status["data_cursor"] = {"epoch": cursor.epoch, "position": cursor.position}
        payloads = round_payloads(self.s, self.cfg.run, status["round"], status["checkpoint"], plan, mcfg.num_layers,
                                  leases, shards_at)
        status["tasks"] = [self.scheduler.add_task("train", p) for p in payloads]
        status["assignment"], status["frozen"] = plan.assignment, plan.frozen
        status["num_layers"], status["num_experts"] = mcfg.num_layers, mcfg.moe.num_experts
        self._write_status(status)
        log.info("swarm round %d: %d train tasks; holders per expert %s; frozen %s; data %s", status["round"],
                 len(payloads), plan.holders, plan.frozen or "none",
                 "synthetic" if leases is None else f"{sum(x['tokens'] for x in leases)} tokens of leases up to epoch "
                 f"{status['data_cursor']['epoch']} document {status['data_cursor']['position']}")

    def _close_round(self, status: dict) -> None:
        from sqlalchemy import select

        from model.checkpoint import load_checkpoint
        from worker.swarm import load_outer_state, save_round_checkpoint

        from . import store as S

        root = Path(self.cfg.state_dir)
        prev = root / "checkpoints" / status["checkpoint"]
        full = load_checkpoint(prev)
        momentum, _ = load_outer_state(prev)
        with self.store.engine.connect() as conn:
            paths = [p for (p,) in conn.execute(select(S.results.c.path).where(
                S.results.c.task_id.in_(status["tasks"])))]
        updated = merge_uploads(full, momentum, [(root / p).read_bytes() for p in paths])
        r = status["round"] + 1
        latest = root / "checkpoints" / self.cfg.run / "latest"
        shutil.rmtree(latest, ignore_errors=True)
        save_round_checkpoint(latest, full, momentum, r)
        name = f"{self.cfg.run}/latest"
        if r % self.s.checkpoint_every == 0 or r == self.s.rounds:
            name = round_name(self.cfg.run, r)
            save_round_checkpoint(root / "checkpoints" / name, full, momentum, r)
        log.info("swarm round %d closed: %d results, %d modules updated; next start %s", r - 1, len(paths),
                 len(updated), name)
        status.update(round=r, checkpoint=name, tasks=[])
        self._write_status(status)

"""`train` tasks: one DiLoCo round of swarm training (see worker/swarm.py for the averaging).

A round, as a plain object (the benchmark and tests use it without the daemon):

    w = SwarmWorker(checkpoint_dir, assignment={0: [0, 1], 1: [2, 3]}, settings=SwarmSettings(run="demo"),
                    inner=InnerConfig(inner_steps=50, total_steps=500), initial_peers=[...])
    metrics = w.run_round(0)      # H inner AdamW steps on held experts, then average + outer step
    w.shutdown()

The worker keeps its local model (trunk + held experts), its inner AdamW state, θ_start and the outer
momentum between rounds, so the daemon reuses one `SwarmWorker` for consecutive `train` tasks of a run
with the same assignment, and builds a new one (from the coordinator's round checkpoint, momentum
included) when it joins or its assignment changes.

Data, `inner.data_source`:
  shards     the task's lease (data_shards/lease.py): a range of the coordinator's shard corpus, fetched
             through the daemon's cache, checked against the manifest's SHA-256 and packed best-fit into
             exactly H·B sequences; inner step s trains on sequences [s·B, (s+1)·B). Tokens counted are
             the real (non-padding) tokens, so a round reports exactly the lease's tokens.
  synthetic  sequence indices [data_offset, data_offset + batch_size) of global inner step round·H + s of a
  / tokens   stateless source (model/data.py), so workers given disjoint offsets together see exactly the
             batches a single process would see with their summed batch size.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.checkpoint import load_config
from model.data import IGNORE, Batch, StatelessData, SyntheticSource, TokenFileSource
from model.train import OptimConfig, build_optimizer, lr_at
from model.transformer import Transformer
from worker.executors import Result, TaskContext, TaskError, register
from worker.swarm import (
    OUTER_STATE,
    Assignment,
    NullSwarmMetrics,
    OuterState,
    RoundReport,
    SwarmAverager,
    SwarmSettings,
    check_assignment,
    flatten,
    held_modules,
    local_index,
    local_model,
    local_model_from_checkpoint,
    local_momentum_from_checkpoint,
    merge_into,
    module_tensors,
    momentum_into,
    outer_round,
    read_round,
    tokens_per_module,
)

log = logging.getLogger(__name__)


@dataclass
class InnerConfig:
    """The inner loop of a round: H AdamW steps on this worker's share of each step's batch."""

    inner_steps: int = 50                   # H
    total_steps: int = 1000                 # inner steps of the whole run: the lr schedule's length
    batch_size: int = 8                     # sequences per inner step on this worker
    micro_batch_size: int = 8
    seq_len: int = 128
    data_source: str = "synthetic"          # synthetic | tokens | shards
    data_path: str | None = None            # token file for data_source=tokens
    lease: dict | None = None               # data_source=shards: this task's lease (data_shards.lease.Lease)
    shards_at: str | None = None            # data_source=shards: the lease's directory under the coordinator's shards/
    data_dtype: str = "uint16"
    data_seed: int = 0
    data_offset: int = 0                    # first sequence index of this worker's share
    optim: OptimConfig = field(default_factory=OptimConfig)
    optimizer: str = "adamw"                # adamw | adamw8bit (bitsandbytes, CUDA only)
    activation_checkpointing: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        for name in ("inner_steps", "total_steps", "batch_size", "micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"inner.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"inner.batch_size={self.batch_size} must be a multiple of "
                             f"inner.micro_batch_size={self.micro_batch_size}")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"inner.optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        if self.data_offset < 0:
            raise ValueError("inner.data_offset must be >= 0")


def build_inner_optimizer(model: torch.nn.Module, inner: InnerConfig) -> torch.optim.Optimizer:
    """AdamW as in the reference trainer (fused on CUDA: no parameter-sized temporaries, which a small GPU
    cannot spare), or bitsandbytes' 8-bit AdamW (a quarter of the state memory)."""
    if inner.optimizer == "adamw":
        return build_optimizer(model, inner.optim)
    if not torch.device(inner.device).type == "cuda":
        raise ValueError("inner.optimizer=adamw8bit needs a CUDA device (bitsandbytes); use adamw on CPU")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError("inner.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes "
                         "(or use inner.optimizer=adamw)") from e
    o = inner.optim
    groups = [g for g in build_optimizer(model, o).param_groups]
    return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of storing them (applied from outside the
    model, parameter names unchanged): activation memory falls from O(L) blocks to about one."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        forward = layer.forward
        layer.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


def make_data(vocab_size: int, inner: InnerConfig) -> StatelessData | None:
    """The stateless source of synthetic/tokens data; None for shards (each round brings its lease)."""
    if inner.data_source == "shards":
        return None
    if inner.data_source == "synthetic":
        return StatelessData(SyntheticSource(vocab_size, inner.seq_len, inner.data_seed))
    if inner.data_source == "tokens":
        if not inner.data_path:
            raise ValueError("inner.data_source=tokens needs inner.data_path")
        return StatelessData(TokenFileSource(inner.data_path, inner.data_dtype, inner.seq_len, inner.data_seed,
                                             0.0, None, vocab_size))
    raise ValueError(f"inner.data_source must be synthetic, tokens or shards, got {inner.data_source!r}")


@dataclass
class LeaseBatches:
    """A lease's packed sequences as tensors, each (H·B, T), and the real tokens of each sequence (H·B,)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def from_sequences(cls, seqs: list, tokens: list[int]) -> LeaseBatches:
        import numpy as np

        stack = lambda name: torch.from_numpy(np.stack([getattr(q, name) for q in seqs])).long()  # noqa: E731
        return cls(stack("input_ids"), stack("labels"), stack("doc_ids"), torch.tensor(tokens, dtype=torch.long))

    def batch(self, rows: range) -> Batch:
        return Batch(self.input_ids[rows.start:rows.stop], self.labels[rows.start:rows.stop],
                     self.doc_ids[rows.start:rows.stop])


class SwarmWorker:
    """One volunteer's side of swarm training: local model, inner optimizer, outer state, averagers."""

    def __init__(self, checkpoint: str | Path | Transformer, assignment: Assignment, settings: SwarmSettings,
                 inner: InnerConfig, *, initial_peers: list[str] | tuple = (), expected_holders=None,
                 client_mode: bool = False, dht=None):
        self.settings, self.inner = settings, inner
        if isinstance(checkpoint, Transformer):  # tests and tools: an in-memory full model, round 0
            self.full_cfg, self.start_round = checkpoint.cfg, 0
            self.assignment = check_assignment(checkpoint.cfg.moe, checkpoint.cfg.num_layers, assignment)
            self.model = local_model(checkpoint, self.assignment)
        else:  # read only the held slices: a worker never holds the full MoE
            self.full_cfg, self.start_round = load_config(checkpoint), read_round(checkpoint)
            self.assignment = check_assignment(self.full_cfg.moe, self.full_cfg.num_layers, assignment)
            self.model = local_model_from_checkpoint(checkpoint, self.assignment)
        self.model = self.model.to(inner.device)
        self.modules = held_modules(self.assignment)
        self.index = local_index(self.assignment)
        if isinstance(checkpoint, Transformer):
            momentum = None
        else:
            momentum = local_momentum_from_checkpoint(checkpoint, self.modules, self.model, self.index)
            momentum = {m: v.to(inner.device) for m, v in momentum.items()}
        self.outer = OuterState(self.model, self.modules, self.index, momentum)
        if inner.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.optimizer = build_inner_optimizer(self.model, inner)
        self.data = make_data(self.model.cfg.vocab_size, inner)
        self.lease: LeaseBatches | None = None   # data_source=shards: the current round's sequences (use_lease)
        if inner.seq_len > self.model.cfg.max_seq_len:
            raise ValueError(f"inner.seq_len={inner.seq_len} exceeds the model's max_seq_len")
        sizes = {m: t.numel() for m, t in self.outer.theta.items()}
        self.averager = SwarmAverager(settings, sizes, initial_peers=initial_peers, dht=dht,
                                      client_mode=client_mode, expected_holders=expected_holders) \
            if settings.averaging else None
        self.last_report: RoundReport | None = None

    @property
    def peer_id(self) -> str | None:
        return self.averager.peer_id if self.averager else None

    def shutdown(self) -> None:
        if self.averager is not None:
            self.averager.shutdown()

    # -- inner loop --

    def use_lease(self, lease: LeaseBatches) -> None:
        """Train the next round on a lease's sequences (data_source=shards): H·B of them, step s on [s·B, (s+1)·B)."""
        n = self.inner.inner_steps * self.inner.batch_size
        if lease.input_ids.shape != (n, self.inner.seq_len):
            raise ValueError(f"a lease of {tuple(lease.input_ids.shape)} sequences does not fit inner_steps · "
                             f"batch_size = {n} sequences of seq_len {self.inner.seq_len}")
        if int(lease.input_ids.max()) >= self.model.cfg.vocab_size:
            raise ValueError(f"the leased shards hold token id {int(lease.input_ids.max())} >= the model's vocab_size "
                             f"{self.model.cfg.vocab_size}: they were made with another tokenizer")
        self.lease = lease

    def _micro_batches(self, step: int) -> tuple[list[Batch], int]:
        """This worker's micro-batches of global inner step `step` and the real tokens in them."""
        inner = self.inner
        accum, m = inner.batch_size // inner.micro_batch_size, inner.micro_batch_size
        if self.lease is None and self.data is None:
            raise ValueError("inner.data_source=shards needs a lease (use_lease) before the round")
        if self.lease is not None:
            first = (step % inner.inner_steps) * inner.batch_size
            rows = [range(first + i * m, first + (i + 1) * m) for i in range(accum)]
            return [self.lease.batch(r) for r in rows], int(self.lease.tokens[first:first + inner.batch_size].sum())
        first = inner.data_offset
        batches = [self.data.source.batch("train", step, range(first + i * m, first + (i + 1) * m))
                   for i in range(accum)]
        return batches, sum(b.input_ids.numel() for b in batches)

    def inner_step(self, step: int) -> tuple[float, int, torch.Tensor]:
        """One AdamW step as in model.train.Trainer.train_step; returns (loss, tokens, tokens_per_expert_LE)."""
        inner, dev = self.inner, torch.device(self.inner.device)
        lr = lr_at(step, inner.optim, inner.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        accum = inner.batch_size // inner.micro_batch_size
        batches, n_tokens = self._micro_batches(step)
        n_targets = sum(b.num_targets for b in batches)
        lm_total = torch.zeros((), device=dev)
        counts_LE = torch.zeros(self.model.cfg.num_layers, self.model.cfg.moe.num_experts, dtype=torch.long)
        for b in batches:
            ids, labels, docs = (t.to(dev) for t in (b.input_ids, b.labels, b.doc_ids))
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):  # as model/train.py
                logits, aux = self.model(ids, doc_ids=docs, return_aux=True)
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                       reduction="sum")
            loss = loss_sum / n_targets + aux.loss(self.model.cfg) / accum
            loss.backward()
            lm_total += loss_sum.detach() / n_targets
            counts_LE += aux.tokens_per_expert_LE.cpu()
        clip = inner.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        lm, gn = lm_total.item(), grad_norm.item()
        if not (math.isfinite(lm) and math.isfinite(gn)):
            raise FloatingPointError(f"non-finite {'loss' if not math.isfinite(lm) else 'gradient norm'} at inner "
                                     f"step {step}; weights were not updated: lower the inner lr")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lm, n_tokens, counts_LE

    def before_outer(self, round_: int) -> None:
        """Hook between the inner steps and averaging (tests inject faults by overriding it)."""

    # -- the round --

    def run_round(self, round_: int, on_step: Callable[[int], None] | None = None,
                  check_stop: Callable[[], None] | None = None) -> dict[str, float]:
        """H inner steps, then averaging and the outer step. Returns the round's metrics. `on_step(s)` runs
        after inner step s (the executor reports progress there, and stops the round if asked to); `check_stop`
        raises to stop the round while it waits for the averaging."""
        t0 = time.perf_counter()
        H = self.inner.inner_steps
        losses, tokens = [], 0
        counts_LE = torch.zeros(self.model.cfg.num_layers, self.model.cfg.moe.num_experts, dtype=torch.long)
        self.model.train()
        try:
            t_step = t0
            for s in range(H):
                loss, n, c = self.inner_step(round_ * H + s)
                losses.append(loss)
                tokens += n
                counts_LE += c
                if on_step is not None:
                    on_step(s)
                if self.averager is not None and s == min(1, H - 1):
                    # matchmaking overlaps the remaining inner steps (step 0 is the slow one: it warms up)
                    self.averager.begin(round_, ready_in=(H - 1 - s) * (time.perf_counter() - t_step))
                t_step = time.perf_counter()
        except BaseException:
            if self.averager is not None:
                self.averager.cancel()
            raise
        self.lease = None  # a lease is trained on once
        inner_seconds = time.perf_counter() - t0
        self.before_outer(round_)
        weights = tokens_per_module(tokens, counts_LE, self.assignment)
        if self.averager is not None:
            self.averager.check_stop = check_stop
        try:
            report = outer_round(self.averager, self.outer, self.settings, round_, weights)
        finally:
            if self.averager is not None:
                self.averager.check_stop = None
        self.last_report = report
        # norms of the Δs that were kept (a refused Δ may be NaN; modules_refused counts those)
        kept = [m for m in report.modules if m.outcome != "refused"]
        norms = [m.delta_norm for m in kept] or [0.0]
        expert_norms = [m.delta_norm for m in kept if m.module != "trunk"]
        return {
            "loss": sum(losses) / len(losses), "loss_last": losses[-1], "tokens": float(tokens),
            "delta_norm_trunk": report.modules[0].delta_norm if report.modules[0].outcome != "refused" else 0.0,
            "delta_norm_expert_max": max(expert_norms) if expert_norms else 0.0,
            "delta_norm_max": max(norms), "bytes_sent": float(report.bytes_sent),
            "inner_seconds": inner_seconds, "round_seconds": time.perf_counter() - t0,
            "allreduce_seconds": report.allreduce_seconds, "reports_seconds": report.reports_seconds,
            "modules_averaged": float(report.count("ok")), "modules_failed": float(report.count("failed")),
            "modules_refused": float(report.count("refused")), "modules_local": float(report.count("local")),
            "modules_mismatch": float(report.count("mismatch")),
        }

    def export_into(self, full: Transformer, momentum_full: dict[str, torch.Tensor]) -> None:
        """Write this worker's held modules and their outer momentum into a full model's layout (the
        coordinator's copy; see worker.swarm.save_round_checkpoint)."""
        merge_into(full, self.model, self.assignment)
        momentum_into(momentum_full, full, self.outer.momentum)

    def upload(self) -> bytes:
        """What goes back to the coordinator after a round: every held module's parameters and outer
        momentum (flat fp32, safetensors), merged into its full copy by coordinator.swarm.merge_uploads."""
        from safetensors.torch import save

        tensors = {}
        for m in self.modules:
            tensors[f"{m}.theta"] = self.outer.theta[m].contiguous().cpu()
            tensors[f"{m}.momentum"] = self.outer.momentum[m].contiguous().cpu()
        return save(tensors)

    def module_state(self, module: str) -> torch.Tensor:
        """The current parameters of a held module, flat (for checks and the coordinator's copy)."""
        return flatten(module_tensors(self.model, module, self.index))


# ---- the daemon's executor -----------------------------------------------------------------------

METRICS: NullSwarmMetrics = NullSwarmMetrics()   # the daemon sets SwarmMetrics(its registry) once at start-up
_WORKERS: dict[str, dict[str, Any]] = {}   # slot -> {"worker", "key", "next_round"}: kept between rounds


def _payload_worker(ctx: TaskContext) -> tuple[SwarmWorker, int]:
    """The SwarmWorker for this task: the one that ran the previous round of the same slot and assignment,
    else a new one built from the round's checkpoint (a newcomer, a restart, or a changed assignment)."""
    p = ctx.payload
    try:
        round_ = int(p["round"])
        assignment = {int(k): list(v) for k, v in p["assignment"].items()}
        settings = SwarmSettings(**p["settings"])
        inner = InnerConfig(**{**p["inner"], "device": ctx.device})
        checkpoint = str(p["checkpoint"])
        slot = str(p.get("slot", "0"))
    except (KeyError, TypeError, ValueError) as e:
        raise TaskError(f"train task payload: {e}") from e
    key = (settings.run, tuple(sorted((k, tuple(v)) for k, v in assignment.items())))
    for other in [s for s, c in _WORKERS.items() if c["next_round"] < round_ or (s == slot and c["key"] != key)]:
        _WORKERS.pop(other)["worker"].shutdown()  # it missed a round or changed: its state is stale
    cur = _WORKERS.get(slot)
    if cur is not None and cur["next_round"] == round_:
        return cur["worker"], round_
    if cur is not None:
        _WORKERS.pop(slot)["worker"].shutdown()
    if ctx.fetch is None:
        raise TaskError("train tasks need the daemon's checkpoint fetcher")
    path = _fetch_checkpoint(ctx, checkpoint)
    _check_memory(ctx, load_config(path), assignment, settings, inner)
    holders = {str(k): int(v) for k, v in (p.get("expected_holders") or {}).items()}
    try:
        w = SwarmWorker(path, assignment, settings, inner, initial_peers=ctx.bootstrap_peers,
                        expected_holders=holders or None, client_mode=ctx.settings.get("client_mode") == "1")
    except ValueError as e:
        raise TaskError(str(e)) from e
    _WORKERS[slot] = {"worker": w, "key": key, "next_round": round_}
    return w, round_


def _check_memory(ctx: TaskContext, cfg, assignment: Assignment, settings: SwarmSettings, inner: InnerConfig) -> None:
    """Refuse a round this worker cannot hold (the coordinator sized the assignment for the worker it planned
    the slot for, but any live worker may lease it): the memory model's peak against the task's budget
    (--max-gpu-memory) or the device's memory (available host memory on CPU). A TaskError gives the task
    back, for a worker that fits."""
    from model.parallel import device_memory
    from worker.memory import estimate_round_memory

    k = max((len(v) for v in assignment.values()), default=0)
    if cfg.moe is None or k < cfg.moe.top_k:
        return  # check_assignment, when the worker is built, says what is wrong with it
    need = estimate_round_memory(cfg, k, micro_batch_size=inner.micro_batch_size, seq_len=inner.seq_len,
                                 optimizer=inner.optimizer, averaging=settings.averaging,
                                 activation_checkpointing=inner.activation_checkpointing).total
    have = ctx.max_memory_bytes or device_memory(torch.device(ctx.device))
    if have and need > have:
        raise TaskError(f"this round holds {k} experts per layer and needs about {need / 2**30:.2f} GiB "
                        f"(worker/memory.py); this worker has {have / 2**30:.2f} GiB for it")


def shutdown_workers() -> None:
    """Stop every kept swarm worker (the daemon calls this when it exits)."""
    while _WORKERS:
        _WORKERS.popitem()[1]["worker"].shutdown()


def _fetch_checkpoint(ctx: TaskContext, name: str) -> Path:
    """A round checkpoint is a directory; the coordinator serves its files one by one. Gather them into
    the task's scratch directory (links to the daemon's cache where possible)."""
    local = ctx.work_dir / "checkpoint"
    local.mkdir(parents=True, exist_ok=True)
    for fname in (OUTER_STATE, "model.safetensors", "config.json"):  # config.json last: marks it complete
        src = ctx.fetch("checkpoint", f"{name}/{fname}")
        dst = local / fname
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return local


_VERIFIED: set[tuple] = set()  # (path, size, mtime, sha256) of shard files already hashed by this process


def _fetch_lease(ctx: TaskContext, lease_dict: dict, shards_at: str | None) -> LeaseBatches:
    """Fetch the lease's shards through the daemon's cache, check each against the SHA-256 the coordinator's
    manifest gave, and pack the lease. A corrupted shard is a TaskError, and its cached copy is deleted so
    the next attempt downloads it again."""
    from data_shards.lease import Lease, lease_sequences
    from data_shards.shards import ShardError, ShardReader

    try:
        lease = Lease.from_dict(lease_dict)
    except ValueError as e:
        raise TaskError(f"train payload.inner.lease: {e}") from None
    if not shards_at:
        raise TaskError("train payload.inner.shards_at is missing: where the lease's shards are on the coordinator")
    readers = {}
    for seg in lease.segments:
        if seg.shard in readers:
            continue
        name = f"{shards_at}/{seg.shard}"
        try:
            path = ctx.fetch("shard", name)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise TaskError(f"shard {name} of the lease could not be fetched: {e}") from None
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, seg.sha256)
        try:
            readers[seg.shard] = ShardReader(path, expected_sha256=None if key in _VERIFIED else seg.sha256)
        except ShardError as e:
            path.unlink(missing_ok=True)  # the cache fetches it again next time
            raise TaskError(f"shard {name} is corrupted, nothing was trained (its cached copy was deleted; if this "
                            f"recurs, the coordinator's copy is damaged and the organizer rebuilds it): {e}") from None
        _VERIFIED.add(key)
    try:
        seqs, tokens = lease_sequences(lease, readers)
    except ShardError as e:
        raise TaskError(f"lease of shards/{shards_at}: {e}") from None
    return LeaseBatches.from_sequences(seqs, tokens)


@register("train")
def run_train(ctx: TaskContext) -> Result:
    """One round. Payload: round, checkpoint, assignment {layer: [experts]}, settings (SwarmSettings fields),
    inner (InnerConfig fields; with data_source=shards a lease and shards_at), expected_holders
    {module: count}."""
    w, round_ = _payload_worker(ctx)
    inner = ctx.payload["inner"]
    if inner.get("data_source") == "shards":
        if ctx.fetch is None:
            raise TaskError("train tasks on shards need the daemon's file fetcher")
        try:
            w.use_lease(_fetch_lease(ctx, inner.get("lease") or {}, inner.get("shards_at")))
        except ValueError as e:
            raise TaskError(str(e)) from None
    ctx.check_stop()
    H = w.inner.inner_steps

    def on_step(s: int) -> None:
        ctx.check_stop()  # a stop request ends the round between inner steps, not after all H
        ctx.report_progress(0.9 * (s + 1) / H)

    try:
        metrics = w.run_round(round_, on_step, ctx.check_stop)  # also stops a round waiting for its all-reduce
    except BaseException:
        # stopped or failed mid-round: its parameters are neither θ_start nor the round's result, so the
        # next attempt must start from the checkpoint, not from this worker
        slot = str(ctx.payload.get("slot", "0"))
        if slot in _WORKERS and _WORKERS[slot]["worker"] is w:
            _WORKERS.pop(slot)["worker"].shutdown()
        raise
    METRICS.record_round(w.last_report, metrics["loss"], metrics["inner_seconds"], metrics["round_seconds"],
                         run=w.settings.run)
    _WORKERS[str(ctx.payload.get("slot", "0"))]["next_round"] = round_ + 1
    ctx.report_progress(1.0)
    report = w.last_report
    return Result(data=w.upload(), metrics=metrics, metadata={
        "round": round_, "peer_id": w.peer_id,
        "modules": {m.module: {"outcome": m.outcome, "delta_norm": m.delta_norm, "group_size": m.group_size,
                               "refused_peers": m.refused_peers} for m in report.modules},
    })

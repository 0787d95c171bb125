"""The worker's round: H inner AdamW steps on the held modules, the pseudo-gradient Δ, averaging, outer step.

A round, as a plain object (the daemon's `train` executor, the benchmarks and tests use it):

    w = SwarmWorker(checkpoint_dir, assignment={0: [0, 1], 1: [2, 3]}, settings=SwarmSettings(run="demo"),
                    inner=InnerConfig(inner_steps=50, total_steps=500), initial_peers=[...])
    metrics = w.run_round(0, ticket=t)   # H inner AdamW steps on held experts, then average + outer step
    w.shutdown()

`ticket` (swarm/ticket.py) names each module's group and weights: a RoundTicket, or a function
`ticket(wait)` that returns it (None while the coordinator has not frozen the round, if not `wait`). The
round asks for it without waiting after inner step 1, so that members that finish early find this
peer ready to take their Δs, and waits for it before averaging.

The worker keeps its local model (trunk + held experts, swarm/tensors.py), its inner AdamW state, θ_start
and the outer momentum between rounds, so the daemon reuses one `SwarmWorker` for consecutive `train` tasks
of a run with the same assignment, and builds a new one (from the coordinator's round checkpoint, momentum
included) when it joins or its assignment changes. Each inner step is model/step.py's `train_step`, the
same step the single-process trainer takes.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import load_config
from model.data import Batch, StatelessData, SyntheticSource, TokenFileSource
from model.optim import lr_at
from model.parallel import apply_activation_checkpointing
from model.step import NonFiniteStep, build_optimizer, train_step
from model.transformer import Transformer

from .exchange import SwarmExchange
from .modules import Assignment, check_assignment, held_modules, local_index
from .outer import OuterState, RoundReport, outer_round
from .round_checkpoint import local_momentum_from_checkpoint, read_round
from .settings import InnerConfig, SwarmSettings
from .tensors import flatten, local_model, local_model_from_checkpoint, merge_into, module_tensors, momentum_into
from .ticket import RoundTicket

log = logging.getLogger(__name__)


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
    """One volunteer's side of swarm training: local model, inner optimizer, outer state, exchange."""

    def __init__(self, checkpoint: str | Path | Transformer, assignment: Assignment, settings: SwarmSettings,
                 inner: InnerConfig, *, initial_peers: list[str] | tuple = (), client_mode: bool = False, dht=None,
                 identity_path: str | None = None):
        self.settings, self.inner, self.identity_path = settings, inner, identity_path
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
            apply_activation_checkpointing(self.model)
        self.optimizer = build_inner_optimizer(self.model, inner)
        self.data = make_data(self.model.cfg.vocab_size, inner)
        self.lease: LeaseBatches | None = None   # data_source=shards: the current round's sequences (use_lease)
        if inner.seq_len > self.model.cfg.max_seq_len:
            raise ValueError(f"inner.seq_len={inner.seq_len} exceeds the model's max_seq_len")
        sizes = {m: t.numel() for m, t in self.outer.theta.items()}
        self.exchange = SwarmExchange(settings, sizes, initial_peers=initial_peers, dht=dht, client_mode=client_mode,
                                      identity_path=identity_path) if settings.averaging else None
        self.last_report: RoundReport | None = None

    @property
    def peer_id(self) -> str | None:
        return self.exchange.peer_id if self.exchange else None

    def shutdown(self) -> None:
        if self.exchange is not None:
            self.exchange.shutdown()

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
        """One step of model/step.py's train_step (the trainer's); returns (loss, tokens, tokens_per_expert_LE)."""
        inner, dev = self.inner, torch.device(self.inner.device)
        batches, n_tokens = self._micro_batches(step)
        try:
            out = train_step(self.model, self.optimizer, batches, lr=lr_at(step, inner.optim, inner.total_steps),
                             n_targets=sum(b.num_targets for b in batches), grad_clip=inner.optim.grad_clip,
                             device=dev, autocast_dtype=torch.bfloat16 if dev.type == "cuda" else None)
        except NonFiniteStep as e:
            raise FloatingPointError(f"non-finite {e.what} at inner step {step}; weights were not updated: lower the "
                                     "inner lr") from None
        return out.loss, n_tokens, out.tokens_per_expert_LE

    def before_outer(self, round_: int) -> None:
        """Hook between the inner steps and averaging (tests inject faults by overriding it)."""

    # -- the round --

    def run_round(self, round_: int, on_step: Callable[[int], None] | None = None,
                  check_stop: Callable[[], None] | None = None,
                  ticket: RoundTicket | Callable[[bool], RoundTicket | None] | None = None) -> dict[str, float]:
        """H inner steps, then averaging and the outer step. Returns the round's metrics. `on_step(s)` runs
        after inner step s (the executor reports progress there, and stops the round if asked to); `check_stop`
        raises to stop the round while it waits for the averaging; `ticket`: see the module docstring (needed
        when averaging is on)."""
        if self.exchange is not None and ticket is None:
            raise ValueError(f"round {round_}: averaging needs the round's ticket")
        get_ticket = (lambda wait: ticket) if isinstance(ticket, RoundTicket) else ticket
        t0 = time.perf_counter()
        H = self.inner.inner_steps
        losses, tokens = [], 0
        self.model.train()
        for s in range(H):
            loss, n, _ = self.inner_step(round_ * H + s)
            losses.append(loss)
            tokens += n
            if on_step is not None:
                on_step(s)
            if self.exchange is not None and s == min(1, H - 1) and self.exchange.ticket(round_) is None:
                early = get_ticket(False)   # members that finish first find this peer ready for their Δs
                if early is not None:
                    self.exchange.set_ticket(early)
        self.lease = None  # a lease is trained on once
        inner_seconds = time.perf_counter() - t0
        self.before_outer(round_)
        if self.exchange is not None:
            self.exchange.check_stop = check_stop
        try:
            if self.exchange is not None and self.exchange.ticket(round_) is None:
                self.exchange.set_ticket(get_ticket(True))
            report = outer_round(self.exchange, self.outer, self.settings, round_)
        finally:
            if self.exchange is not None:
                self.exchange.check_stop = None
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
            "allreduce_seconds": report.allreduce_seconds, "aggregate_seconds": report.aggregate_seconds,
            "modules_averaged": float(report.count("ok")), "modules_failed": float(report.count("failed")),
            "modules_refused": float(report.count("refused")), "modules_local": float(report.count("local")),
        }

    def export_into(self, full: Transformer, momentum_full: dict[str, torch.Tensor]) -> None:
        """Write this worker's held modules and their outer momentum into a full model's layout (the
        coordinator's copy; see swarm.round_checkpoint.save_round_checkpoint)."""
        merge_into(full, self.model, self.assignment)
        momentum_into(momentum_full, full, self.outer.momentum)

    def upload(self) -> bytes:
        """What goes back to the coordinator after a round: every held module's parameters and outer
        momentum (flat fp32, safetensors), merged into its full copy by swarm.round_checkpoint.merge_uploads."""
        from safetensors.torch import save

        tensors = {}
        for m in self.modules:
            tensors[f"{m}.theta"] = self.outer.theta[m].contiguous().cpu()
            tensors[f"{m}.momentum"] = self.outer.momentum[m].contiguous().cpu()
        return save(tensors)

    def module_state(self, module: str) -> torch.Tensor:
        """The current parameters of a held module, flat (for checks and the coordinator's copy)."""
        return flatten(module_tensors(self.model, module, self.index))



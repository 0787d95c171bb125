"""`train` tasks: one swarm round (swarm/round.py), adapted to the daemon.

The executor parses the payload (swarm.settings.TrainPayload: the whole contract of a round), fetches the
round checkpoint and the lease's shards through the daemon's cache, checks that the round fits this
worker's memory, joins the round (the coordinator's Join RPC, TaskContext.join) and runs
`SwarmWorker.run_round` with the ticket the coordinator signed (its signature checked with the key the
daemon pinned). It keeps, for the daemon that owns it, what outlives a
round: the `SwarmWorker` of each slot (its model, optimizer, outer state and hivemind peer, reused for the
slot's next round with the same assignment) and the shard files it has already hashed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import load_config
from swarm.round import LeaseBatches, SwarmWorker
from swarm.round_checkpoint import OUTER_STATE
from swarm.settings import TrainPayload
from swarm.ticket import RoundTicket, TicketError, expect_ticket, verify_ticket
from worker.metrics import NullSwarmMetrics, SwarmMetrics

from . import Result, TaskContext, TaskError

log = logging.getLogger(__name__)

IDENTITY_FILE = "swarm_identity.key"   # in the daemon's cache dir: its libp2p key, so its peer id survives restarts
JOIN_POLL_S = 0.5                       # how often a round waiting for its ticket asks the coordinator again


def _holders(p: TrainPayload) -> tuple[int, int]:
    """(trunk holders, most holders of a held expert) this round: the Δs the exchange may receive."""
    held = p.expected_holders or {}
    experts = [n for m, n in held.items() if m != "trunk"]
    return held.get("trunk", 2), max(experts, default=2)


@dataclass
class _Kept:
    worker: SwarmWorker
    key: tuple            # (run, assignment): a slot whose key changes needs a new worker
    next_round: int       # the round this worker can run next


class TrainExecutor:
    """The daemon's `train` executor: `executor(ctx) -> Result`, `close()` when the daemon exits."""

    def __init__(self, registry=None):
        self.metrics = SwarmMetrics(registry) if registry is not None else NullSwarmMetrics()
        self.kept: dict[str, _Kept] = {}              # slot -> its worker, kept between rounds
        self.verified: set[tuple] = set()             # (path, size, mtime, sha256) of shard files already hashed

    def close(self) -> None:
        """Stop every kept swarm worker (their DHT and p2pd leave cleanly)."""
        while self.kept:
            self.kept.popitem()[1].worker.shutdown()

    def __call__(self, ctx: TaskContext) -> Result:
        """One round of the payload's slot."""
        try:
            p = TrainPayload.from_dict(ctx.payload, device=ctx.device)
        except ValueError as e:
            raise TaskError(str(e)) from None
        w = self._worker(ctx, p)
        if p.inner.data_source == "shards":
            try:
                w.use_lease(self._fetch_lease(ctx, p))
            except ValueError as e:
                raise TaskError(str(e)) from None
        ctx.check_stop()
        H = w.inner.inner_steps

        def on_step(s: int) -> None:
            ctx.check_stop()  # a stop request ends the round between inner steps, not after all H
            ctx.report_progress(0.9 * (s + 1) / H)

        try:
            # also stops a round waiting for its ticket or the other members' Δs
            metrics = w.run_round(p.round, on_step, ctx.check_stop, ticket=self._tickets(ctx, p, w))
        except BaseException:
            # stopped or failed mid-round: its parameters are neither θ_start nor the round's result, so the
            # next attempt must start from the checkpoint, not from this worker
            if p.slot in self.kept and self.kept[p.slot].worker is w:
                self.kept.pop(p.slot).worker.shutdown()
            raise
        self.metrics.record_round(w.last_report, metrics["loss"], metrics["inner_seconds"], metrics["round_seconds"],
                                  run=w.settings.run)
        self.kept[p.slot].next_round = p.round + 1
        ctx.report_progress(1.0)
        report = w.last_report
        return Result(data=w.upload(), metrics=metrics, metadata={
            "round": p.round, "peer_id": w.peer_id,
            "modules": {m.module: {"outcome": m.outcome, "delta_norm": m.delta_norm, "group_size": m.group_size,
                                   "refused_peers": m.refused_peers} for m in report.modules},
        })

    def _worker(self, ctx: TaskContext, p: TrainPayload) -> SwarmWorker:
        """The SwarmWorker for this task: the one that ran the previous round of the same slot and assignment,
        else a new one built from the round's checkpoint (a newcomer, a restart, or a changed assignment)."""
        key = (p.settings.run, tuple(sorted((k, tuple(v)) for k, v in p.assignment.items())))
        for slot in [s for s, k in self.kept.items() if k.next_round < p.round or (s == p.slot and k.key != key)]:
            self.kept.pop(slot).worker.shutdown()  # it missed a round or changed: its state is stale
        cur = self.kept.get(p.slot)
        if cur is not None and cur.next_round == p.round:
            return cur.worker
        if cur is not None:
            self.kept.pop(p.slot).worker.shutdown()
        if ctx.fetch is None:
            raise TaskError("train tasks need the daemon's checkpoint fetcher")
        path = self._fetch_checkpoint(ctx, p.checkpoint)
        self._check_memory(ctx, load_config(path), p)
        # one persistent libp2p identity per daemon (its cache dir), for the worker of the slot it runs; a
        # second slot at the same time gets a fresh one
        identity = ctx.work_dir.parent / IDENTITY_FILE
        taken = any(k.worker.identity_path == str(identity) for k in self.kept.values())
        try:
            w = SwarmWorker(path, p.assignment, p.settings, p.inner, initial_peers=ctx.bootstrap_peers,
                            client_mode=ctx.settings.get("client_mode") == "1",
                            identity_path=None if taken else str(identity))
        except ValueError as e:
            raise TaskError(str(e)) from e
        self.kept[p.slot] = _Kept(w, key, p.round)
        return w

    @staticmethod
    def _tickets(ctx: TaskContext, p: TrainPayload, w: SwarmWorker):
        """`ticket(wait)` for SwarmWorker.run_round: the round's ticket from the coordinator's Join RPC, its
        signature checked with the pinned key and its fields with this task's. Joins once now, so that the
        coordinator can freeze the round as soon as every slot joined."""
        if not p.settings.averaging:
            return None
        key = ctx.settings.get("ticket_key")
        if ctx.join is None or not key:
            raise TaskError("swarm rounds need the coordinator's round tickets (the Join RPC and a ticket key at "
                            "Register); this coordinator sent none: upgrade it")

        def ticket(wait: bool) -> RoundTicket | None:
            while True:
                signed = ctx.join(w.peer_id)
                if signed is not None:
                    try:
                        t = verify_ticket(key, signed.body, signed.signature)
                        return expect_ticket(t, run=p.settings.run, round_=p.round, slot=p.slot, peer_id=w.peer_id,
                                             now=time.time())
                    except TicketError as e:
                        raise TaskError(str(e)) from None
                if not wait:
                    return None
                ctx.check_stop()   # the lease cancelled, or SIGTERM
                time.sleep(JOIN_POLL_S)

        ticket(False)  # join now
        return ticket

    @staticmethod
    def _check_memory(ctx: TaskContext, cfg, p: TrainPayload) -> None:
        """Refuse a round this worker cannot hold (the coordinator sized the assignment for the worker it planned
        the slot for, but any live worker may lease it): the memory model's peak against the task's budget
        (--max-gpu-memory) or the device's memory (available host memory on CPU). A TaskError gives the task
        back, for a worker that fits."""
        from model.parallel import device_memory
        from swarm.memory import estimate_round_memory

        k = max((len(v) for v in p.assignment.values()), default=0)
        if cfg.moe is None or k < cfg.moe.top_k:
            return  # check_assignment, when the worker is built, says what is wrong with it
        inner = p.inner
        need = estimate_round_memory(cfg, k, micro_batch_size=inner.micro_batch_size, seq_len=inner.seq_len,
                                     optimizer=inner.optimizer, averaging=p.settings.averaging,
                                     activation_checkpointing=inner.activation_checkpointing,
                                     holders=_holders(p)).total
        have = ctx.max_memory_bytes or device_memory(torch.device(ctx.device))
        if have and need > have:
            raise TaskError(f"this round holds {k} experts per layer and needs about {need / 2**30:.2f} GiB "
                            f"(swarm/memory.py); this worker has {have / 2**30:.2f} GiB for it")

    @staticmethod
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

    def _fetch_lease(self, ctx: TaskContext, p: TrainPayload) -> LeaseBatches:
        """Fetch the lease's shards through the daemon's cache, check each against the SHA-256 the coordinator's
        manifest gave, and pack the lease. A corrupted shard is a TaskError, and its cached copy is deleted so
        the next attempt downloads it again."""
        from data_shards.lease import lease_sequences
        from data_shards.shards import ShardError, ShardReader

        if ctx.fetch is None:
            raise TaskError("train tasks on shards need the daemon's file fetcher")
        lease, shards_at = p.inner.lease, p.inner.shards_at
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
                readers[seg.shard] = ShardReader(path, expected_sha256=None if key in self.verified else seg.sha256)
            except ShardError as e:
                path.unlink(missing_ok=True)  # the cache fetches it again next time
                raise TaskError(f"shard {name} is corrupted, nothing was trained (its cached copy was deleted; if "
                                f"this recurs, the coordinator's copy is damaged and the organizer rebuilds it): {e}"
                                ) from None
            self.verified.add(key)
        try:
            seqs, tokens = lease_sequences(lease, readers)
        except ShardError as e:
            raise TaskError(f"lease of shards/{shards_at}: {e}") from None
        return LeaseBatches.from_sequences(seqs, tokens)

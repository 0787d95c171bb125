"""The coordinator's side of swarm training while it runs: the round driver, the full copy, the bootstrap peer.

    mujina-coordinator init-swarm --config project.yaml --checkpoint UPCYCLED_MOE

copies the upcycled checkpoint to `STATE_DIR/checkpoints/{run}/round_000000/` (the project checkpoint
format plus `outer_momentum.safetensors`, zeros; its `tokenizer/` too, which every round checkpoint then
carries, so that `mujina-model export` of any round gives a model that `sample --prompt` can use) and
records the run in `STATE_DIR/swarm/{run}.json`.
While `serve` runs, `SwarmDriver` then, once per round:

1. plans the expert assignment from the registered workers' memory (`plan_assignment`: every worker holds
   the trunk and as many experts as its budget fits, experts with the fewest holders first, so each gets
   >= `replication` holders where the workers allow; an expert nobody holds stays frozen, is logged and
   shown by the `mujina_swarm_expert_holders` gauge as 0). Only live workers get a slot: those seen
   (heartbeat or lease request) within `SwarmDriver.live_window_s`;
2. adds one `train` task per slot (swarm.settings.TrainPayload, built by coordinator/swarm_plan.py: round,
   checkpoint, assignment, settings, inner loop, expected holders per module). Any live worker may lease a
   slot's task: one that cannot hold its assignment (the memory model against its budget) gives it back for
   another. With `swarm.shards` set, each task's inner loop carries a *lease* (data_shards/lease.py): a
   disjoint range of the shard corpus that packs into exactly inner_steps · batch_size sequences; leases
   advance round by round through the corpus (the cursor is kept in the status file), wrapping into a new
   epoch with a new shard order. The shard files are served as shards/swarm-{run}/ (`publish_shards`). The
   validator (validate_train.py) refuses a result that claims more tokens than its lease holds; credit is
   the tokens trained;
3. freezes the round's members once every slot's worker joined (the Join RPC, coordinator/swarm_join.py:
   it freezes them itself the moment the last slot joins) or `join_timeout_s` passed: `status["members"]`
   maps task id -> hivemind peer id, and Join answers each slot with a signed round ticket naming its
   averaging groups and their weights;
4. when every task of the round is done (or dead), or its deadline (`round_timeout_s`) passed and the
   unfinished ones were cancelled, merges the checked uploads (validate_train.py) into its full copy: per
   module the element-wise median of its holders' θ and momentum (swarm.round_checkpoint.merge_uploads),
   and writes `round_{r+1}` beside the current checkpoint, then points `latest` at it; round checkpoints
   that are not every `checkpoint_every`-th, the first or the last are pruned. FetchCheckpoint serves
   them, so a newcomer starts from the current round, momentum included.

Crashes: every step of opening and closing a round can be interrupted by a kill -9 and resumes from the
status file. Opening writes the plan (task ids, which are deterministic, and payloads) before adding the
tasks in one transaction (again idempotently after a crash); closing writes the new checkpoint under a
temporary name, renames it, swaps the `latest` symlink, and only then advances the status (clearing the
members). Joins before the freeze live in memory only: after a restart the workers, which poll Join, join again.

The bootstrap DHT peer runs in the coordinator's process (`start_bootstrap_dht`); its multiaddrs are
added to RegisterResponse.bootstrap_peers.

Importing this module stays free of torch and hivemind, so a coordinator without a swarm run never loads
them. A swarm run does: the bootstrap peer is a hivemind DHT (hivemind imports torch), and the driver reads
round checkpoints (model/checkpoint.py) when it opens a round and merges the uploads when it closes one;
each function imports what it needs when called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from .swarm_plan import plan_assignment, round_payloads, worker_budget

log = logging.getLogger(__name__)


# ---- the full copy -------------------------------------------------------------------------------

OUTVOTED = "outvoted.json"   # in a round checkpoint: module -> the tasks whose uploads were out-voted on it


def round_name(run: str, round_: int) -> str:
    return f"{run}/round_{round_:06d}"


def init_swarm(state_dir: Path, run: str, checkpoint: Path) -> str:
    """Start a swarm run from an upcycled MoE checkpoint; returns the round-0 checkpoint name."""
    from model.checkpoint import load_checkpoint, write_json
    from swarm.round_checkpoint import save_round_checkpoint

    net = load_checkpoint(checkpoint)  # validates the directory
    if net.cfg.moe is None:
        raise ValueError(f"{checkpoint} is a dense model: upcycle it first (mujina-model upcycle --checkpoint "
                         f"{checkpoint} --experts 8 --top-k 2 --out MOE)")
    status_path = Path(state_dir) / "swarm" / f"{run}.json"
    if status_path.exists():
        raise ValueError(f"{status_path} exists: run {run!r} is already a swarm run; pick another run name")
    name = round_name(run, 0)

    def write(directory: Path) -> None:
        save_round_checkpoint(directory, net, {}, 0)
        carry_tokenizer(Path(checkpoint), directory)

    _write_round(Path(state_dir) / "checkpoints", name, write)
    status_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(status_path, {"round": 0, "checkpoint": name, "assignment": {}, "tasks": [],
                             "num_layers": net.cfg.num_layers, "num_experts": net.cfg.moe.num_experts})
    return name


def carry_tokenizer(src: Path, dst: Path) -> None:
    """Copy checkpoint `src`'s tokenizer/ (the run's tokenizer files) into checkpoint directory `dst`, if it has
    one: round checkpoints are written from tensors, so without this they lose it (and `export` of a round
    gives a model no prompt text can be fed to)."""
    from model.checkpoint import TOKENIZER

    if (src / TOKENIZER).is_dir():
        shutil.copytree(src / TOKENIZER, dst / TOKENIZER, dirs_exist_ok=True)


def round_task_id(run: str, round_: int, slot: str) -> str:
    """The `train` task of (run, round, slot): the same id every time, so adding a round's tasks again (a
    driver resuming after a crash) adds nothing."""
    return hashlib.sha256(f"{run}\0train\0{round_}\0{slot}".encode()).hexdigest()[:32]


def _write_round(checkpoints: Path, name: str, write) -> Path:
    """Write a round checkpoint as a whole or not at all: `write(directory)` fills a temporary directory
    that is then renamed to `checkpoints/name` (a complete one already there, from a run that crashed after
    writing it, is kept), and `latest` beside it is pointed at it (a symlink, swapped atomically)."""
    final = checkpoints / name
    if not (final / "config.json").is_file():
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a partial directory (written in place by an older version)
        write(tmp)
        os.replace(tmp, final)
    latest = final.parent / "latest"
    link = final.parent / ".latest.tmp"
    link.unlink(missing_ok=True)
    os.symlink(final.name, link)
    if latest.is_dir() and not latest.is_symlink():
        shutil.rmtree(latest)  # the real directory older versions wrote
    os.replace(link, latest)
    return final


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


def start_bootstrap_dht(host: str = "0.0.0.0", port: int = 0):
    """The swarm's bootstrap DHT peer, run by the coordinator; returns (dht, multiaddrs to hand out)."""
    from swarm.processes import start_dht

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

    def __init__(self, cfg, store, scheduler, poll_s: float = 1.0, joins=None):
        """`joins`: the server's RoundJoins (coordinator/swarm_join.py), whose lock guards the status file and
        whose members the driver freezes at the join timeout; without one (no server: tests, tools) the driver
        keeps its own, with a key nobody is given."""
        from swarm.ticket import TicketKey

        from .swarm_join import RoundJoins

        self.cfg, self.store, self.scheduler, self.s = cfg, store, scheduler, cfg.swarm
        self.joins = joins or RoundJoins(cfg, store, scheduler, TicketKey.generate())
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
        self.joins.write_status(status)  # under the lock Join's freeze takes; keeps the round's frozen members

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
        from swarm.memory import experts_that_fit

        from . import store as S

        status = self._status()
        mcfg = load_config(Path(self.cfg.state_dir) / "checkpoints" / status["checkpoint"])
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(S.workers.c.id, S.workers.c.token, S.workers.c.capabilities).where(
                S.workers.c.last_seen >= time.time() - self.live_window_s())
                .order_by(S.workers.c.last_seen.desc(), S.workers.c.id)).all()
        eligible, per_token = {}, {}
        for wid, token, capabilities in rows:
            capabilities = json.loads(capabilities)
            if capabilities.get("kinds") and "train" not in capabilities["kinds"]:
                continue  # it said which kinds it runs, and train is not one of them
            if per_token.get(token, 0) >= self.s.slots_per_token:
                continue  # the token's most recently seen workers have its slots (sybils, stale registrations)
            per_token[token] = per_token.get(token, 0) + 1
            eligible[wid] = capabilities
        # every slot holds the trunk, `replication` slots each expert: the Δs a worker's exchange receives
        slots = len(eligible) or self.s.workers
        kw = dict(micro_batch_size=self.s.micro_batch_size, seq_len=self.s.seq_len,
                  holders=(slots, min(self.s.replication, slots)))
        caps = {wid: experts_that_fit(mcfg, worker_budget(c, self.s.memory_budget_bytes), **kw)
                for wid, c in eligible.items()}
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

    def _crash_point(self, where: str) -> None:
        """Called between the steps of opening and closing a round that a crash could separate (tests kill the
        driver here, through a subclass)."""

    def step(self) -> None:
        """Add the current round's tasks if it has none; close the round once all of them finished, or once its
        deadline passed. Every step can be interrupted (kill -9) and resumes from the status file."""
        if not self.status_path.exists():
            return
        status = self._status()
        if "opening" in status:  # a crash while the round's tasks were added: add the planned ones
            self._add_planned(status)
            return
        if status["round"] >= self.s.rounds:
            return
        if not status["tasks"]:
            self._open_round(status)
            return
        self.joins.freeze_if_late()
        states = self._task_states(status["tasks"])
        unfinished = [t for t in status["tasks"] if states.get(t) not in ("done", "dead")]
        late = time.time() > status.get("opened_at", time.time()) + self.s.round_timeout_s
        if unfinished and late:
            n = self.scheduler.cancel_tasks(unfinished, f"swarm round {status['round']} passed its deadline "
                                                        f"(swarm.round_timeout_s = {self.s.round_timeout_s:g})")
            log.warning("swarm round %d: deadline passed, %d unfinished slot(s) cancelled; closing it with the "
                        "results it has", status["round"], n)
            unfinished = []
        if not unfinished:
            self._close_round(status)

    def _task_states(self, ids: list[str]) -> dict[str, str]:
        from sqlalchemy import select

        from . import store as S

        with self.store.engine.connect() as conn:
            return dict(conn.execute(select(S.tasks.c.id, S.tasks.c.state).where(S.tasks.c.id.in_(ids))).all())

    def _open_round(self, status: dict) -> None:
        """Plan the round, write the plan (the round's task ids and payloads) into the status file, then add the
        tasks: a crash after the plan is written adds exactly those tasks when the driver resumes."""
        from model.checkpoint import load_config

        mcfg = load_config(Path(self.cfg.state_dir) / "checkpoints" / status["checkpoint"])
        plan = plan_assignment(self._capacities(), mcfg.moe.num_experts, mcfg.moe.top_k, self.s.replication,
                               status.get("assignment"))
        leases = shards_at = None
        if self.s.shards is not None:
            from data_shards.lease import Cursor

            corpus, shards_at = self._corpus(mcfg.vocab_size)
            leases, cursor = corpus.plan(Cursor(**status.get("data_cursor", {})), len(plan.assignment),
                                         self.s.inner_steps * self.s.batch_size, self.s.seq_len)
            status["data_cursor"] = {"epoch": cursor.epoch, "position": cursor.position}
        payloads = round_payloads(self.s, self.cfg.run, status["round"], status["checkpoint"], plan, mcfg.num_layers,
                                  leases, shards_at)
        status["tasks"] = [round_task_id(self.cfg.run, status["round"], p["slot"]) for p in payloads]
        status["opening"], status["opened_at"] = payloads, time.time()
        status["assignment"], status["frozen"] = plan.assignment, plan.frozen
        status["num_layers"], status["num_experts"] = mcfg.num_layers, mcfg.moe.num_experts
        self._write_status(status)
        log.info("swarm round %d: %d train tasks; holders per expert %s; frozen %s; data %s", status["round"],
                 len(payloads), plan.holders, plan.frozen or "none",
                 "synthetic" if leases is None else f"{sum(x.tokens for x in leases)} tokens of leases up to epoch "
                 f"{status['data_cursor']['epoch']} document {status['data_cursor']['position']}")
        self._crash_point("open:planned")
        self._add_planned(status)

    def _add_planned(self, status: dict) -> None:
        self.scheduler.add_tasks("train", list(zip(status["tasks"], status["opening"], strict=True)))
        self._crash_point("open:added")
        del status["opening"]
        self._write_status(status)

    def _close_round(self, status: dict) -> None:
        """Merge the round's accepted uploads into the full copy and write the next round's checkpoint beside the
        current one (swapped in as `latest` atomically); then advance the status; then prune round checkpoints
        that are neither kept (every checkpoint_every rounds, the first, the last) nor current."""
        from sqlalchemy import select

        from . import store as S

        root = Path(self.cfg.state_dir)
        r = status["round"] + 1
        name = round_name(self.cfg.run, r)
        with self.store.engine.connect() as conn:
            results = conn.execute(select(S.results.c.task_id, S.results.c.path).where(
                S.results.c.task_id.in_(status["tasks"]))).all()
        paths = [p for _, p in results]
        merged: dict = {}

        def write(directory: Path) -> None:
            from model.checkpoint import load_checkpoint
            from swarm.round_checkpoint import load_outer_state, merge_uploads, save_round_checkpoint

            prev = root / "checkpoints" / status["checkpoint"]
            full = load_checkpoint(prev)
            momentum, _ = load_outer_state(prev)
            updated, disagree = merge_uploads(full, momentum, [(root / p).read_bytes() for p in paths])
            merged.update(modules=len(updated))
            save_round_checkpoint(directory, full, momentum, r)
            carry_tokenizer(prev, directory)
            # kept with the checkpoint, so that a driver killed before the credit is withdrawn withdraws it on resume
            write_json(directory / OUTVOTED, {m: [results[i][0] for i in v] for m, v in disagree.items()})
            self._crash_point("close:written")

        from model.checkpoint import write_json

        _write_round(root / "checkpoints", name, write)
        self._crash_point("close:renamed")
        outvoted_at = root / "checkpoints" / name / OUTVOTED
        outvoted = json.loads(outvoted_at.read_text()) if outvoted_at.exists() else {}
        for module, who in outvoted.items():
            log.warning("swarm round %d, module %s: the upload(s) of task(s) %s are far from the holders' median; "
                        "merged without them deciding", r - 1, module, who)
        self._withdraw_credit(sorted({t for who in outvoted.values() for t in who}), r - 1)
        log.info("swarm round %d closed: %d results, %s modules merged; next start %s", r - 1, len(paths),
                 merged.get("modules", "all (already written)"), name)
        status.update(round=r, checkpoint=name, tasks=[])
        status.pop("opened_at", None)
        status.pop("members", None)
        if outvoted:
            status["disagree"] = {str(r - 1): outvoted}
        self._write_status(status)
        self._crash_point("close:status")
        self._prune(r)

    def _withdraw_credit(self, task_ids: list[str], round_: int) -> None:
        """No credit for a round's out-voted uploads: their ledger rows go and their results are marked
        uncredited (idempotent: a resumed close withdraws nothing twice). Pending credit until a round closes
        (escrow) is issue 18's; until then the credit is granted at upload and withdrawn here."""
        if not task_ids:
            return
        from sqlalchemy import delete, update

        from . import store as S

        with self.store.tx() as conn:
            gone = conn.execute(delete(S.ledger).where(S.ledger.c.task_id.in_(task_ids))).rowcount
            conn.execute(update(S.results).where(S.results.c.task_id.in_(task_ids)).values(credited=False))
        log.warning("swarm round %d: withdrew the credit of out-voted task(s) %s (%d ledger rows)", round_,
                    ", ".join(task_ids), gone)

    def _prune(self, current: int) -> None:
        """Delete round checkpoints that are not kept: every checkpoint_every-th, round 0 and the last stay."""
        base = Path(self.cfg.state_dir) / "checkpoints" / self.cfg.run
        for d in base.glob("round_*"):
            try:
                r = int(d.name.removeprefix("round_"))
            except ValueError:
                continue
            if r != current and r != 0 and r % self.s.checkpoint_every and r != self.s.rounds:
                shutil.rmtree(d, ignore_errors=True)

"""Rounds always finish (coordinator/swarm_driver.py): a kill -9 at every step of opening and closing a round
leaves a loadable `latest` and a round that resumes with exactly its planned tasks; a round past its deadline
cancels its unfinished slots and closes; uploads merge by the holders' median, never "last wins"."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from sqlalchemy import select

from coordinator import store as S
from coordinator.config import load_project
from coordinator.scheduler import RequestError, Scheduler
from coordinator.store import Store
from coordinator.swarm_driver import SwarmDriver, init_swarm
from model.checkpoint import load_checkpoint
from swarm.modules import held_modules
from swarm.round_checkpoint import load_outer_state, merge_uploads
from swarm.tensors import flatten, module_tensors
from tests.conftest import REPO, tiny_model
from tests.coordinator.conftest import TOKEN, write_project

SWARM = {"inner_steps": 2, "rounds": 3, "batch_size": 2, "micro_batch_size": 2, "seq_len": 32, "workers": 2,
         "averaging_timeout": 35.0, "checkpoint_every": 2}

# The driver, in a process of its own, killed (os._exit: no cleanup, as kill -9) at one named point.
CHILD = """
import os, sys
from coordinator.config import load_project
from coordinator.scheduler import Scheduler
from coordinator.store import Store
from coordinator.swarm_driver import SwarmDriver

class Crashing(SwarmDriver):
    def _crash_point(self, where):
        if where == sys.argv[2]:
            os._exit(137)

cfg = load_project(sys.argv[1])
store = Store.open(cfg.db_url())
Crashing(cfg, store, Scheduler(store, cfg)).step()
print("no crash", flush=True)
"""


class Project:
    def __init__(self, tmp_path: Path, **swarm):
        self.path = write_project(tmp_path, swarm={**SWARM, **swarm})
        self.cfg = load_project(self.path)
        self.state = self.cfg.state_dir
        self.state.mkdir(parents=True)
        self.store = Store.open(self.cfg.db_url())
        self.store.add_token("alice", TOKEN)
        self.sched = Scheduler(self.store, self.cfg)
        torch.manual_seed(0)
        init_swarm(self.state, self.cfg.run, self._moe(tmp_path))

    @staticmethod
    def _moe(tmp_path: Path) -> Path:
        from model.checkpoint import save_checkpoint

        return save_checkpoint(tmp_path / "moe", tiny_model())

    def driver(self) -> SwarmDriver:
        return SwarmDriver(self.cfg, self.store, self.sched)

    def status(self) -> dict:
        return json.loads((self.state / "swarm" / f"{self.cfg.run}.json").read_text())

    def train_tasks(self) -> list:
        with self.store.read() as conn:
            return conn.execute(select(S.tasks).where(S.tasks.c.kind == "train")).all()

    def crash_at(self, where: str) -> None:
        out = subprocess.run([sys.executable, "-c", CHILD, str(self.path), where], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 137, f"the driver did not stop at {where}:\n{out.stdout}\n{out.stderr}"

    def complete_all(self, theta_shift: float = 0.0, shifts: dict[int, float] | None = None) -> list[str]:
        """Every task of the round leased and completed by alice with an upload of the round's start + shift
        (`shifts`: the i-th leased task's own); returns the task ids in lease order. Alice's worker then leaves
        (its registration is aged past the live window), so the next round plans `workers` slots however long
        the test took to get there."""
        status = self.status()
        full = load_checkpoint(self.state / "checkpoints" / status["checkpoint"])
        wid = self.sched.register(TOKEN, "alice", {"kinds": ["train"]}, 0, False, 1.0)
        done = []
        for i, _ in enumerate(status["tasks"]):
            shift = (shifts or {}).get(i, theta_shift)
            grant = self.sched.lease(TOKEN, wid, ["train"])
            payload = json.loads(grant.payload_json)
            assignment = {int(k): v for k, v in payload["assignment"].items()}
            data = save({f"{m}.{part}": (flatten(module_tensors(full, m)) + shift if part == "theta"
                                         else torch.zeros_like(flatten(module_tensors(full, m))))
                         for m in held_modules(assignment) for part in ("theta", "momentum")})
            metrics = {"loss": 1.0, "tokens": 64.0, "delta_norm_trunk": 0.0, "delta_norm_max": 0.0}
            complete(self.sched, self.state, TOKEN, grant, metrics, data)
            done.append(grant.task_id)
        with self.store.tx() as conn:
            conn.execute(S.workers.update().where(S.workers.c.id == wid).values(last_seen=0.0))
        return done


def complete(sched: Scheduler, state: Path, token: str, grant, metrics: dict, data: bytes) -> None:
    info = sched.lease_for_complete(token, grant.task_id, grant.lease_id)
    credits = sched.check_result(info, metrics, data)
    rel = f"results/{grant.task_id}.{grant.lease_id}.bin"
    (state / "results").mkdir(exist_ok=True)
    tmp = state / "results" / "upload.tmp"
    tmp.write_bytes(data)
    sched.complete(info, hashlib.sha256(data).hexdigest(), len(data), rel, metrics, credits,
                   commit_file=lambda: os.replace(tmp, state / rel))


def assert_latest_loads(p: Project) -> None:
    latest = p.state / "checkpoints" / p.cfg.run / "latest"
    assert latest.is_symlink() and (latest / "config.json").is_file()
    load_checkpoint(latest)


@pytest.mark.parametrize("where", ["open:planned", "open:added"])
def test_a_crash_while_opening_a_round_resumes_with_exactly_its_planned_tasks(tmp_path, where):
    p = Project(tmp_path)
    p.crash_at(where)
    assert_latest_loads(p)
    planned = p.status()["tasks"]
    assert len(planned) == 2
    p.driver().step()  # resumes: adds what the plan names, nothing else
    status = p.status()
    assert "opening" not in status and status["tasks"] == planned
    assert sorted(t.id for t in p.train_tasks()) == sorted(planned)
    p.driver().step()  # the round is open: nothing more is added
    assert len(p.train_tasks()) == 2


@pytest.mark.parametrize("where", ["close:written", "close:renamed", "close:status"])
def test_a_crash_while_closing_a_round_leaves_a_loadable_latest_and_the_round_closes(tmp_path, where):
    p = Project(tmp_path)
    p.driver().step()  # opens round 0
    p.complete_all()
    p.crash_at(where)
    assert_latest_loads(p)  # at every point: the previous round's, or the new one whole
    p.driver().step()  # closes round 0 (again, or only what was left; after close:status it opens round 1)
    status = p.status()
    assert status["round"] == 1 and status["checkpoint"] == f"{p.cfg.run}/round_000001"
    assert_latest_loads(p)
    latest = p.state / "checkpoints" / p.cfg.run / "latest"
    assert os.readlink(latest) == "round_000001"
    assert not list((p.state / "checkpoints" / p.cfg.run).glob(".*tmp"))
    start = load_checkpoint(p.state / "checkpoints" / p.cfg.run / "round_000000")
    for a, b in zip(start.parameters(), load_checkpoint(latest).parameters(), strict=True):
        assert torch.equal(a, b)  # the uploads were the round's start: the merge changed nothing
    p.driver().step()  # and the next round opens
    assert p.status()["round"] == 1 and len(p.status()["tasks"]) == 2
    assert len(p.train_tasks()) == 4  # two rounds of two slots: nothing orphaned, nothing twice


def test_rounds_keep_every_kth_checkpoint_and_the_current_one(tmp_path):
    p = Project(tmp_path)
    for r in range(3):
        p.driver().step()
        p.complete_all()
        p.driver().step()
        assert p.status()["round"] == r + 1
    kept = sorted(d.name for d in (p.state / "checkpoints" / p.cfg.run).iterdir())
    assert kept == ["latest", "round_000000", "round_000002", "round_000003"]  # K = 2; 3 is the last
    assert load_outer_state(p.state / "checkpoints" / p.cfg.run / "latest")[1] == 3


def test_a_round_past_its_deadline_cancels_its_unfinished_slots_and_closes(tmp_path):
    """One slot finishes, the other's worker holds its lease and never answers: once swarm.round_timeout_s has
    passed the slot is cancelled (dead, no credit; its lease is not renewed, so the worker is told CANCEL), the
    round closes with the one result, and a late Complete from the cancelled lease is refused."""
    from tests.conftest import wait_until

    p = Project(tmp_path, round_timeout_s=1.0)
    p.driver().step()
    wid = p.sched.register(TOKEN, "alice", {"kinds": ["train"]}, 0, False, 1.0)
    done, stuck = p.sched.lease(TOKEN, wid, ["train"]), p.sched.lease(TOKEN, wid, ["train"])
    full = load_checkpoint(p.state / "checkpoints" / p.status()["checkpoint"])
    assignment = {int(k): v for k, v in json.loads(done.payload_json)["assignment"].items()}
    upload = save({f"{m}.{part}": flatten(module_tensors(full, m)) * (1 if part == "theta" else 0)
                   for m in held_modules(assignment) for part in ("theta", "momentum")})
    metrics = {"loss": 1.0, "tokens": 64.0, "delta_norm_trunk": 0.0, "delta_norm_max": 0.0}
    complete(p.sched, p.state, TOKEN, done, metrics, upload)
    driver = p.driver()

    def closed():
        driver.step()
        return p.status()["round"] == 1
    wait_until(closed, "the round's deadline to pass and the driver to close it", limit=60)
    with p.store.read() as conn:
        task = conn.execute(select(S.tasks).where(S.tasks.c.id == stuck.task_id)).first()
        credit = conn.execute(select(S.ledger).where(S.ledger.c.task_id == stuck.task_id)).all()
    assert task.state == "dead" and "deadline" in task.last_error and credit == []
    _, renewed = p.sched.heartbeat(TOKEN, wid, [(stuck.lease_id, 0.5)])
    assert renewed[0][1] is False  # -> CANCEL
    with pytest.raises(RequestError, match="cancelled"):
        p.sched.lease_for_complete(TOKEN, stuck.task_id, stuck.lease_id)


def test_the_merge_is_the_holders_median_not_the_last_upload():
    """Three holders of every module: two honest (the same small move), one liar (a large move). The merged
    module is the honest move, the liar is named; with two holders the merge is their mean."""
    full = tiny_model()
    modules = held_modules({0: [0, 1, 2, 3]})
    start = {m: flatten(module_tensors(full, m)).clone() for m in modules}

    def upload(shift: float) -> bytes:
        return save({f"{m}.{part}": (start[m] + shift) if part == "theta" else torch.full_like(start[m], shift)
                     for m in modules for part in ("theta", "momentum")})

    merged, disagree = merge_uploads(full, {}, [upload(1e-3), upload(5.0), upload(1e-3)])
    assert merged == set(modules) and disagree == {m: [1] for m in modules}
    for m in modules:
        torch.testing.assert_close(flatten(module_tensors(full, m)), start[m] + 1e-3, rtol=0, atol=1e-6)
    pair = tiny_model()
    merge_uploads(pair, {}, [upload(1e-3), upload(3e-3)])
    for m in modules:
        torch.testing.assert_close(flatten(module_tensors(pair, m)), start[m] + 2e-3, rtol=0, atol=1e-6)


@pytest.mark.parametrize("crash", [None, "close:renamed"])
def test_an_out_voted_upload_loses_its_credit_and_the_others_keep_theirs(tmp_path, crash):
    """Three slots hold every module; one upload is a plausible but wrong θ (within what the validator
    accepts, far from the other two). The merge out-votes it, and closing the round withdraws its credit
    (also when the driver is killed after the checkpoint is written and resumes)."""
    p = Project(tmp_path, workers=3, replication=3)
    p.driver().step()  # opens round 0 with three slots
    tasks = p.complete_all(theta_shift=1e-4, shifts={1: 2e-3})
    liar, honest = tasks[1], [tasks[0], tasks[2]]

    def credited() -> dict[str, float]:
        with p.store.read() as conn:
            return dict(conn.execute(select(S.ledger.c.task_id, S.ledger.c.amount)).all())

    assert set(credited()) == set(tasks)  # credited at upload: each passed the validator
    if crash:
        p.crash_at(crash)
    p.driver().step()  # closes round 0
    status = p.status()
    assert status["round"] == 1
    assert set(credited()) == set(honest)
    with p.store.read() as conn:
        flags = dict(conn.execute(select(S.results.c.task_id, S.results.c.credited)).all())
    assert flags == {liar: False} | dict.fromkeys(honest, True)
    assert all(who == [liar] for who in status["disagree"]["0"].values())

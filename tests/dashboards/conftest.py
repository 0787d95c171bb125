"""A live coordinator with real work in it, scraped by a real Prometheus (Debian's `prometheus`).

`live` (one per session) starts `mujina-coordinator serve --metrics-port --http-port` as a
subprocess, starts Prometheus on a free loopback port with the shipped prometheus.yml and rules.yml
(scrape and evaluation every second; targets rewritten to the live ports, jobs of exporters that do
not exist yet dropped, see catalog.PENDING_JOBS), then drives a short scenario through the gRPC API:

    alice and bob register a worker each;
    a task with max_attempts=1 fails            -> 1 dead task
    3 eval results with losses 2.0, 2.4, 2.8     -> ledger credit, a rising eval loss
    alice holds 1 lease (heartbeated)            -> 1 leased task
    bob leases 3 tasks and never heartbeats them -> 3 expired leases of 8 granted (5 s leases)

Workers heartbeat in a background thread throughout, as daemons do. Before them a real worker daemon
(`mujina-worker run --metrics-port`, volunteer carol, kinds generate,train) runs one generate task with the
tiny teacher of tests/worker/teacher.py and one swarm round, and stays up, scraped as job mujina-workers;
and the cluster trainer's rank 0 (`python -m model.train`, train.metrics_port) trains a tiny model
throughout, scraped as job mujina-cluster.

The swarm: the project has a `swarm:` section of one round of 2 inner steps with one train slot, and
`mujina-coordinator init-swarm` starts it from a tiny upcycled MoE (1 layer, 4 experts, top-2) before
`serve`, whose SwarmDriver opens round 0 before any worker registers. The slot's memory budget fits 2
experts: experts 2 and 3 have no holder (frozen), so MujinaExpertWithoutHolders fires; carol holds the
trunk and experts 0 and 1 alone (no peer to average with), trains, uploads, and the driver closes the round
(mujina_swarm_round 1). One round only: the next would be planned for alice and bob too, who never train.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, wait_until
from tests.coordinator.conftest import OTHER_TOKEN, TOKEN, free_port, write_project
from tests.dashboards.catalog import PENDING_JOBS, PROMETHEUS_YML, RULES_YML, scrape_names

LOSSES = [2.0, 2.4, 2.8]   # alice, bob, alice
EXPIRED = 3
WORKER_TOKEN = "mj_test_token_carol"
WORKER_NAME = "carol-cpu"
SWARM = {"inner_steps": 2, "rounds": 1, "batch_size": 2, "micro_batch_size": 2, "seq_len": 32, "workers": 1,
         "averaging_timeout": 35.0, "compression": "none", "checkpoint_every": 1}
HELD = 2  # experts the one slot's memory budget fits (of 4): the other 2 are frozen


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Prometheus:
    """A Prometheus server process and a small client of its HTTP API."""

    def __init__(self, root: Path, scrape_jobs: dict[str, list[str]]):
        self.root, self.port = root, free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config_for(scrape_jobs)))
        self.log = root / "prometheus.log"
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        wait_until(self._ready, f"Prometheus to be ready (log: {self.log})")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return http_get(self.url + "/-/ready", timeout=1) is not None
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list:
        """Instant query at now; the series of a vector result ([] when none)."""
        try:
            data = self.api("query", query=promql)
        except urllib.error.HTTPError as err:  # a malformed expression: Prometheus says why
            raise AssertionError(f"Prometheus refused {promql!r}: {err.read().decode()}") from None
        return data["result"] if data["resultType"] == "vector" else [data["result"]]

    def value(self, promql: str) -> float | None:
        series = self.query(promql)
        return float(series[0]["value"][1]) if series else None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def config_for(scrape_jobs: dict[str, list[str]]) -> dict:
    """The shipped prometheus.yml, pointed at the live exporters and made fast for a test."""
    doc = yaml.safe_load(PROMETHEUS_YML.read_text())
    doc["global"].update(scrape_interval="1s", evaluation_interval="1s")
    doc["rule_files"] = [str(RULES_YML)]
    jobs = []
    for job in doc["scrape_configs"]:
        name = job["job_name"]
        if name in scrape_jobs:
            job["static_configs"] = [{"targets": scrape_jobs[name]}]
            jobs.append(job)
        elif name not in PENDING_JOBS:
            raise AssertionError(f"prometheus.yml job {name!r} is neither started by the tests nor listed in "
                                 "catalog.PENDING_JOBS")
    doc["scrape_configs"] = jobs
    return doc


@dataclass
class Live:
    root: Path
    http_url: str                      # the status page, ending in /
    metrics_urls: dict[str, str]       # scrape job -> one of its /metrics URLs
    db_url: str
    prometheus: Prometheus | None
    prometheus_missing: str = ""
    metric_names: set[str] = field(default_factory=set)   # every series name the live exporters expose


def start_coordinator(project: Path, db_url: str, log: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """`mujina-coordinator serve` as a subprocess; returns it and its gRPC port once it is healthy."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(project),
                             "--db", db_url, "--listen", f"127.0.0.1:{port}", *extra], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"coordinator exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
            except grpc.RpcError:
                return False

    wait_until(healthy, "the coordinator to answer health checks")
    return proc, port


def _scenario(target: str, store, scheduler, stop: threading.Event, prom: Prometheus | None) -> threading.Thread:
    """Drive the coordinator through the gRPC API (see the module docstring); returns the heartbeat thread.
    With `prom`, each eval loss is scraped before the next is reported, so Prometheus sees the loss rise."""
    from coordinator.api import mujina_pb2 as pb
    from coordinator.api.client import CoordinatorClient

    # eval tasks of a pretrain checkpoint: the organizer names the phase (mujina_latest_loss{phase})
    payload = {"checkpoint": "c", "shard": "s", "shard_tokens": 1000, "phase": "pretrain"}
    scheduler.add_task("eval", payload, priority=10, max_attempts=1)
    for _ in range(len(LOSSES) + 1 + EXPIRED + 2):
        scheduler.add_task("eval", payload)
    alice, bob = CoordinatorClient(target, TOKEN, timeout=10), CoordinatorClient(target, OTHER_TOKEN, timeout=10)
    w_alice = alice.register("alice-gpu", speed=900.0, devices=[("cuda", "RTX 4090", 24 << 30)]).worker_id
    w_bob = bob.register("bob-laptop", speed=120.0).worker_id

    t = alice.lease(w_alice, ["eval"]).task
    assert alice.fail(t.task_id, t.lease_id, pb.ERROR, "out of memory").dead
    for i, loss in enumerate(LOSSES):
        client, wid = (alice, w_alice) if i % 2 == 0 else (bob, w_bob)
        t = client.lease(wid, ["eval"]).task
        assert client.complete(t.task_id, t.lease_id, b"eval result",
                               {"loss": loss, "tokens": 500, "gpu_seconds": 0.5}).credited
        if prom is not None:  # one scrape per loss at least, so Prometheus sees the loss rise
            # (B023: wait_until calls the lambda within this iteration, so it sees this loss)
            wait_until(lambda: prom.value('mujina_latest_loss{kind="eval"}') == loss,  # noqa: B023
                       f"Prometheus to scrape the eval loss {loss}")
    held = alice.lease(w_alice, ["eval"]).task.lease_id
    for _ in range(EXPIRED):
        assert bob.lease(w_bob, ["eval"]).HasField("task")

    def beat():
        try:
            while not stop.wait(0.4):
                alice.heartbeat(w_alice, [(held, 0.5)])
                bob.heartbeat(w_bob, [])  # bob's worker is alive but forgot its leases: they expire
        finally:
            alice.close()
            bob.close()

    thread = threading.Thread(target=beat, name="heartbeats", daemon=True)
    thread.start()
    return thread


def generate_payload(teacher: Path) -> dict:
    """One generate task of two Japanese prompts for the tiny teacher (validated like a planned one)."""
    from data_shards.synthetic import model_files_hash

    prompts = [{"id": f"dash-{i}", "lang": "ja", "template": "qa",
                "messages": [{"role": "user", "content": f"{topic}について説明してください。"}]}
               for i, topic in enumerate(["天気", "料理"])]
    return {"teacher": {"name": "tiny", "sha256": model_files_hash(teacher)}, "answer": 0, "prompts": prompts,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 40, "seed": 0},
            "limits": {"min_chars": 10, "max_chars": 2000}, "batch_size": 2}


def start_worker(target: str, root: Path, metrics_port: int, teacher: Path) -> subprocess.Popen:
    """A real worker daemon, once its metrics endpoint answers; it leases the pending generate task."""
    from tests.worker.conftest import spawn_worker

    # kinds include train, so the daemon's registry carries the swarm's mujina_swarm_* series too
    proc = spawn_worker(target, root / "worker", "--name", WORKER_NAME, "--kinds", "generate,train", "--teacher",
                        f"tiny={teacher}", "--metrics-port", str(metrics_port), token=WORKER_TOKEN)

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited {proc.returncode}:\n{(root / 'worker.log').read_text()[-3000:]}")
        try:
            return b"mujina_worker_state" in http_get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)
        except OSError:
            return False

    wait_until(serving, "the worker's metrics endpoint", limit=60)
    return proc


def start_trainer(root: Path, metrics_port: int) -> subprocess.Popen:
    """The cluster trainer's rank 0 (`python -m model.train`, a tiny model, steps enough to outlast the
    session) once its gauges include an eval loss and MFU (CPU has no peak-FLOPS entry: one is given)."""
    over = {"train.steps": 10**7, "train.metrics_port": metrics_port, "train.peak_tflops": 1, "train.log_every": 1,
            "train.eval_every": 5, "train.eval_batches": 1, "train.save_every": 0, "train.batch_size": 2,
            "train.micro_batch_size": 2, "data.seq_len": 32}
    log = open(root / "trainer.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "model.train", "--config", str(REPO / "configs" / "debug.yaml"),
                             "--out", str(root / "cluster"), *(f"--set={k}={v}" for k, v in over.items())],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited {proc.returncode}:\n{(root / 'trainer.log').read_text()[-3000:]}")
        try:
            text = http_get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)
        except OSError:
            return False
        return b"mujina_train_eval_loss" in text and b"mujina_train_mfu" in text

    wait_until(serving, "the trainer's metrics endpoint", limit=120)
    return proc


def sample(metrics_text: str, name: str) -> float:
    """The value of an unlabelled series in a Prometheus text exposition."""
    return next(float(line.split()[1]) for line in metrics_text.splitlines() if line.startswith(name + " "))


def swarm_budget(experts: int) -> int:
    """The memory budget (bytes) in which a round of the tiny MoE fits `experts` experts and no more."""
    from swarm.memory import estimate_round_memory
    from tests.swarm.conftest import tiny_model

    cfg = tiny_model().cfg
    return estimate_round_memory(cfg, experts, micro_batch_size=SWARM["micro_batch_size"],
                                 seq_len=SWARM["seq_len"]).total


def init_swarm(project: Path, root: Path) -> None:
    """`mujina-coordinator init-swarm` on a tiny upcycled MoE (tests/swarm's: 1 layer, 4 experts, top-2)."""
    from model.checkpoint import save_checkpoint
    from tests.conftest import run_cli
    from tests.swarm.conftest import tiny_model

    moe = save_checkpoint(root / "moe", tiny_model())
    run_cli("coordinator.cli", "init-swarm", "--config", str(project), "--checkpoint", str(moe))


# Package scope: the live stack (a coordinator, a worker, a cluster trainer that trains until stopped,
# Prometheus) is torn down when tests/dashboards ends, instead of taking a core from the rest of the suite.
@pytest.fixture(scope="package")
def live(tmp_path_factory):
    from coordinator import store as S
    from coordinator.config import load_project
    from coordinator.scheduler import Scheduler
    from coordinator.swarm_driver import read_status
    from tests.data_shards.corpus import japanese_documents
    from tests.worker.teacher import build_teacher

    root = tmp_path_factory.mktemp("dashboards")
    # leases of 5 s: a worker whose heartbeats stall while hivemind starts on a loaded machine keeps its lease
    project = write_project(root, run="dash", leases={"duration_s": 5.0},
                            swarm={**SWARM, "memory_budget_bytes": swarm_budget(HELD)})
    cfg = load_project(project)
    init_swarm(project, root)
    db_url = cfg.db_url()
    metrics_port, http_port = free_port(), free_port()
    proc, grpc_port = start_coordinator(project, db_url, root / "coordinator.log",
                                        "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
                                        "--http-port", str(http_port), "--http-host", "127.0.0.1")
    worker_port, cluster_port = free_port(), free_port()
    stop, prom, beats, store, worker, trainer = threading.Event(), None, None, None, None, None
    try:
        store = S.Store.open(db_url)
        store.add_token("alice", TOKEN)
        store.add_token("bob", OTHER_TOKEN)
        store.add_token("carol", WORKER_TOKEN)
        scheduler = Scheduler(store, cfg)
        # the worker first, so that Prometheus never sees its target down (MujinaTargetDown stays quiet)
        teacher = build_teacher(root / "teacher", japanese_documents(30, seed=3))
        scheduler.add_task("generate", generate_payload(teacher))
        # round 0 is planned before anyone registers: one slot, sized by swarm.memory_budget_bytes
        wait_until(lambda: (read_status(cfg.state_dir, "dash") or {}).get("tasks"), "the swarm's round 0")
        worker = start_worker(f"127.0.0.1:{grpc_port}", root, worker_port, teacher)
        trainer = start_trainer(root, cluster_port)
        missing = "" if shutil.which("prometheus") else ("Debian's prometheus is not installed "
                                                          "(apt-get install prometheus; .ci/run does it)")
        if not missing:
            prom = Prometheus(root / "prometheus", {"mujina-coordinator": [f"127.0.0.1:{metrics_port}"],
                                                    "mujina-workers": [f"127.0.0.1:{worker_port}"],
                                                    "mujina-cluster": [f"127.0.0.1:{cluster_port}"]})
            # Targets appear a few seconds after start-up; the scenario must happen while it scrapes.
            wait_until(lambda: prom.value("min(up)") == 1 and len(prom.query("up")) == 3,
                       "the first scrape of every target")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        worker_url = f"http://127.0.0.1:{worker_port}/metrics"
        # carol's two tasks first: a lease of hers that expired (a loaded machine starving her heartbeats
        # while hivemind starts) must not change the scenario's count of expired leases
        done = 'mujina_worker_tasks_total{kind="generate",outcome="completed"} 1.0'
        wait_until(lambda: done in http_get(worker_url).decode(), "the worker's generate task", limit=120)
        wait_until(lambda: read_status(cfg.state_dir, "dash")["round"] == 1, "the swarm's round 0 to close",
                   limit=120)
        expired = EXPIRED + sample(http_get(metrics_url).decode(), "mujina_leases_expired_total")
        beats = _scenario(f"127.0.0.1:{grpc_port}", store, scheduler, stop, prom)
        wait_until(lambda: sample(http_get(metrics_url).decode(), "mujina_leases_expired_total") == expired,
                   f"{EXPIRED} leases to expire")
        lv = Live(root, f"http://127.0.0.1:{http_port}/",
                  {"mujina-coordinator": metrics_url, "mujina-workers": worker_url,
                   "mujina-cluster": f"http://127.0.0.1:{cluster_port}/metrics"}, db_url, prom, missing)
        for url in lv.metrics_urls.values():
            lv.metric_names |= scrape_names(http_get(url).decode())
        if prom is not None:  # Prometheus has scraped the final state
            wait_until(lambda: prom.value("mujina_leases_expired_total") == expired
                       and prom.value('sum(mujina_tasks{state="leased"})') == 1
                       and prom.value('sum(mujina_worker_tasks_total{outcome="completed"})') == 2
                       and prom.value("mujina_swarm_round") == 1,
                       "Prometheus to scrape the run")
        yield lv
    finally:
        stop.set()
        if beats is not None:
            beats.join(timeout=5)
        for child in (worker, trainer):
            if child is not None:
                child.terminate()
                child.wait(timeout=30)
        if prom is not None:
            prom.stop()
        if store is not None:
            store.close()
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def prom(live) -> Prometheus:
    if live.prometheus is None:
        pytest.skip(live.prometheus_missing)
    return live.prometheus

"""The README's first command, `make demo` (scripts/demo.py), at `--scale tiny`: every stage for real
(tokenizer, shards, torchrun with 2 processes, upcycling, a coordinator and 3 worker daemons generating
synthetic data, MoE training, ledger, Hugging Face export and a transformers sample).

One demo run serves the tests: it is interrupted with SIGINT while the workers generate, run again and
interrupted while the swarm's workers start their round (hivemind DHTs and p2pd daemons), then run
a third time, which must skip the finished stages, resume and finish. After each, no process of the demo
may be left (every descendant carries MUJINA_DEMO=OUT in its environment, p2pd and torch's shared-memory
manager included), and none may have needed SIGKILL: the workers exit by themselves on SIGTERM."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # the demo three times (two interrupted, one to the end): minutes

DEMO = [sys.executable, str(REPO / "scripts" / "demo.py"), "--scale", "tiny", "--ports", "auto"]


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose arguments contain `text` (every child of the demo names its output directory:
    configs, cache dirs, project file) or whose environment holds MUJINA_DEMO=text (everything the demo
    started, and what those started in turn: torchrun's ranks, hivemind's processes, p2pd)."""
    found, marker = [], f"MUJINA_DEMO={text}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = next((x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if x.startswith("State:")), "")
        except OSError:
            continue
        if (text in cmd or marker in env) and int(pid) != os.getpid() and "zombie" not in state:
            found.append(f"{pid}: {cmd}")
    return found


class Run:
    """The demo as a subprocess whose output is collected line by line."""

    def __init__(self, out: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([*DEMO, "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, limit: float) -> None:
        end = time.monotonic() + limit
        while not any(text in x for x in self.lines):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"demo never printed {text!r}:\n{self.output}")
            time.sleep(0.2)

    def wait_for_line(self, prefix: str, text: str, limit: float) -> None:
        end = time.monotonic() + limit
        while not any(prefix in x and text in x for x in self.lines):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"demo never printed {prefix!r}...{text!r}:\n{self.output}")
            time.sleep(0.2)

    def finish(self, limit: float) -> int:
        try:
            rc = self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"demo still running after {limit} s:\n{self.output}") from None
        self.thread.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def read_live_endpoints(output: str) -> dict:
    """While the workers run: the status page, its JSON and a worker's Prometheus endpoint, at the addresses
    the demo printed."""
    page = re.search(r"status page (http://127\.0\.0\.1:\d+/)", output).group(1)
    worker_port = re.search(r"worker-1 \(volunteer-1\) metrics on :(\d+)", output).group(1)
    with urllib.request.urlopen(page, timeout=10) as r:
        html = r.read().decode()
    end = time.monotonic() + 15
    while True:  # the page caches its reading of the store for 2 s
        with urllib.request.urlopen(page + "api/status", timeout=10) as r:
            status = json.loads(r.read())
        if status["workers_registered"] == 3 or time.monotonic() > end:
            break
        time.sleep(0.5)
    with urllib.request.urlopen(f"http://127.0.0.1:{worker_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    return {"html": html, "status": status, "worker_metrics": metrics}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "runs"
    first = Run(out)
    try:
        for i in (1, 2, 3):  # then each loads the teacher for a few seconds: still the workers stage
            first.wait_for(f"[worker-{i}] ", limit=400)
            first.wait_for_line(f"[worker-{i}] ", "registered as worker", limit=60)
        live = read_live_endpoints(first.output)
        first.proc.send_signal(signal.SIGINT)
        rc = first.finish(limit=90)
        left = processes_mentioning(str(out))
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    second = Run(out)
    try:  # Ctrl-C while the swarm's workers start their round: hivemind's processes must go too
        second.wait_for("swarm round 0/", limit=400)
        second.wait_for_line("[worker-1] ", "running train task", limit=60)
        second.proc.send_signal(signal.SIGINT)
        rc_swarm = second.finish(limit=90)
        left_swarm = processes_mentioning(str(out))
    finally:
        if second.proc.poll() is None:
            second.proc.kill()
    third = Run(out)
    rc3 = third.finish(limit=600)
    yield {"out": out, "interrupted": (rc, left, first.output), "swarm": (rc_swarm, left_swarm, second.output),
           "resumed": (rc3, third.output), "live": live}
    for line in processes_mentioning(str(out)):  # never leave anything behind, even when a test failed
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_ctrl_c_during_the_workers_stage_stops_every_child(demo):
    rc, left, output = demo["interrupted"]
    assert rc == 130, output
    assert "SIGINT: stopping" in output, output
    assert re.search(r"stopping \d+ child processes: .*worker-3.*coordinator", output), output
    for i in (1, 2, 3):  # every worker handed its lease back
        assert f"[worker-{i}] " in output and any(f"[worker-{i}] " in x and "SIGTERM: leasing nothing more" in x
                                                  for x in output.splitlines()), output
    assert left == [], f"processes left after Ctrl-C: {left}\n{output}"
    assert "SIGKILL" not in output, output


def test_ctrl_c_during_the_swarm_round_stops_every_child_and_hivemind(demo):
    rc, left, output = demo["swarm"]
    assert rc == 130, output
    assert "SIGINT: stopping" in output and "swarm round 0/" in output, output
    assert re.search(r"stopping \d+ child processes: .*worker-3.*coordinator", output), output
    assert re.search(r"^  3 stopped in [\d.]+ s$", output, re.M), output  # the workers, by themselves
    assert "SIGKILL" not in output, output
    assert left == [], f"processes left after Ctrl-C: {left}\n{output}"


def test_status_page_and_metrics_are_live_while_the_workers_run(demo):
    live = demo["live"]
    assert "<html" in live["html"].lower()
    assert live["status"]["run"] == "demo" and live["status"]["workers_registered"] == 3
    assert any(t["kind"] == "generate" for t in live["status"]["tasks"])
    assert "mujina_worker" in live["worker_metrics"]


def test_rerun_resumes_and_the_pipeline_produced_everything(demo):
    out = demo["out"]
    rc, output = demo["resumed"]
    assert rc == 0, output
    for n in (1, 2, 3, 4, 5):  # finished before the interrupts: skipped, not redone
        assert next(x for x in output.splitlines() if x.startswith(f"== {n}/12")).endswith("(done before: skipped)")
    assert "synthetic data: done before (skipped)" in output  # stage 6 starts only the coordinator again
    # shards with a manifest
    manifest = json.loads((out / "shards" / "train" / "manifest.json").read_text())
    assert manifest["shards"] and sum(s["documents"] for s in manifest["shards"]) > 300
    # torchrun pretraining on 2 processes, and the loss fell
    metrics = [json.loads(x) for x in (out / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert "dense on 2 processes" in (out / "logs" / "pretrain.log").read_text()
    # upcycled MoE
    assert json.loads((out / "moe-init" / "config.json").read_text())["moe"]["num_experts"] == 4
    # accepted synthetic records, sharded, and credit for the volunteers
    generated = (out / "coordinator" / "synthetic" / "generated.jsonl").read_text().splitlines()
    assert generated and all(json.loads(x)["messages"][-1]["role"] == "assistant" for x in generated)
    assert (out / "coordinator" / "synthetic" / "shards" / "manifest.json").exists()
    ledger = subprocess.run([sys.executable, "-m", "coordinator.cli", "ledger", "--csv", "--config",
                             str(out / "project.yaml")], cwd=REPO, capture_output=True, text=True, check=True)
    rows = list(csv.DictReader(io.StringIO(ledger.stdout)))
    generated_credit = [r for r in rows if r["kind"] == "generate" and r["unit"] == "tokens_generated"]
    assert sum(float(r["amount"]) for r in generated_credit) > 0
    assert {r["volunteer"] for r in rows} <= {"volunteer-1", "volunteer-2", "volunteer-3"}
    assert "leaderboard (mujina-coordinator ledger)" in output and "volunteer-" in output
    # swarm rounds by the workers over hivemind, credited as tokens_trained, merged into round checkpoints
    trained = [r for r in rows if r["kind"] == "train" and r["unit"] == "tokens_trained"]
    assert len(trained) == 3 and all(float(r["amount"]) > 0 for r in trained), rows
    last_round = (out / "swarm.done").read_text().strip()
    assert last_round == "demo/round_000001"
    assert (out / "coordinator" / "checkpoints" / last_round / "config.json").exists()
    # the swarm's MoE trained on the corpus and the synthetic shards, exported, and sampled with transformers
    moe_cfg = yaml.safe_load((out / "moe.yaml").read_text())
    assert moe_cfg["init_from"].endswith(last_round)
    assert "synthetic shards 0.2" in output
    # post-training: LoRA SFT on the synthetic chat shards, then LoRA DPO from the merged SFT model when the judge
    # chose pairs; the exported chat model is the newest of them
    sft = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft and yaml.safe_load((out / "sft.yaml").read_text())["finetune"]["mode"] == "lora"
    assert (out / "sft" / "final" / "config.json").exists()
    dpo = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert abs(dpo[0]["loss"] - 0.6931) < 1e-3 and "rewards/margins" in dpo[0]  # ln 2: the policy is its reference
    dpo_cfg = yaml.safe_load((out / "dpo.yaml").read_text())
    assert dpo_cfg["finetune"]["init_from"] == str(out / "sft" / "final")
    if dpo_cfg["data"]["path"].endswith("dpo_constructed.jsonl"):  # the tiny teacher's verdicts were unparsable
        assert "DPO on" in output and "constructed pairs" in output
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == "mixtral"
    assert "chat_template" in json.loads((out / "hf" / "tokenizer_config.json").read_text())
    chat = json.loads(next(x for x in (out / "logs" / "chat.log").read_text().splitlines() if x.startswith("{")))
    assert isinstance(chat["reply"], str) and chat["generated_ids"]
    sample = json.loads(next(x for x in (out / "logs" / "sample.log").read_text().splitlines()
                             if x.startswith("{")))
    assert sample["prompt"] == "東京の" and len(sample["generated_ids"]) > 0 and sample["text"]
    assert "status page" in output and "dashboards/prometheus/prometheus.yml" in output
    # after the swarm the workers stopped by themselves (hivemind included), and so did the coordinator
    stopping = output[output.index("stopping the workers"):output.index("== 8/12")]
    assert re.search(r"^  3 stopped in [\d.]+ s$", stopping, re.M), stopping
    assert "SIGKILL" not in output, output
    assert processes_mentioning(str(out)) == []


def test_an_output_directory_of_another_run_is_refused(tmp_path):
    (tmp_path / "dense").mkdir()  # e.g. the outputs of an older demo
    r = subprocess.run([*DEMO, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pass --fresh" in r.stderr, r.stderr
    (tmp_path / "demo.json").write_text('{"scale": "full"}')
    r = subprocess.run([*DEMO, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "at scale 'full', not 'tiny'" in r.stderr, r.stderr
    assert (tmp_path / "dense").is_dir()  # nothing deleted without --fresh

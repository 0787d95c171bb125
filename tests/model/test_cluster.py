"""Cluster mode: the same model.train under a real `torchrun` (gloo backend, CPU, FSDP2).

Tolerance for "the same losses": 1e-5 absolute on losses near 6. Two processes sum each step's loss
in a different order (per-process partial sums, then the all-reduce; FSDP's reduce-scatter of
gradients instead of one backward) so fp32 rounding differs in the last bits: measured differences are
about 2e-7; a real bug (a wrong normalisation, a rank reading the other's data, a missed gradient
average) moves the loss by 1e-3 or more within a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, mujina_model, mujina_train

TOL = 1e-5

BASE = {
    "model": {"preset": "debug", "max_seq_len": 64},
    "data": {"source": "synthetic", "seq_len": 64},
    # min_lr == lr: constant after warmup, so a run's schedule does not depend on train.steps and a
    # run stopped at step 6 and continued to 12 follows the 12-step run exactly.
    "optim": {"lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 12, "batch_size": 8, "micro_batch_size": 2, "log_every": 1, "eval_every": 6,
              "eval_batches": 2, "save_every": 4, "keep_checkpoints": 5, "seed": 3},
}
MOE = {**BASE, "model": {"preset": "debug", "max_seq_len": 64, "moe": {"num_experts": 4, "top_k": 2}}}


def write_config(path: Path, cfg: dict, **train) -> Path:
    cfg = json.loads(json.dumps(cfg))
    cfg["train"].update(train)
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(config: Path, out: Path, *extra: str, nproc: int = 2, check: bool = True, torchrun_args=(),
             timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         *torchrun_args, "-m", "model.train", "--config", str(config), "--out", str(out), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_curve(got: dict[int, dict], want: dict[int, dict], steps=None):
    steps = sorted(want) if steps is None else steps
    assert sorted(got) == sorted(steps)
    for s in steps:
        for key in ("loss", "grad_norm", "aux_loss", "eval_loss"):
            if key in want[s]:
                assert abs(got[s][key] - want[s][key]) <= TOL, (s, key, got[s][key], want[s][key])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process runs every distributed run is compared with: dense and MoE."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, cfg in (("dense", BASE), ("moe", MOE)):
        config = write_config(root / f"{name}.yaml", cfg)
        mujina_train("--config", str(config), "--out", str(root / name))
        runs[name] = (config, root / name)
    return runs


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.slow  # torchrun: 2 training processes
def test_two_processes_give_the_losses_of_one(reference, tmp_path, kind):
    config, ref = reference[kind]
    r = torchrun(config, tmp_path / "two")
    assert "2 processes (FSDP2)" in r.stderr
    got, want = records(tmp_path / "two"), records(ref)
    assert_same_curve(got, want)
    assert got[12]["tokens"] == want[12]["tokens"] == 12 * 8 * 64
    # The final weights rank 0 gathered equal the one-process model's.
    from model import load_checkpoint

    a, b = load_checkpoint(tmp_path / "two" / "final"), load_checkpoint(ref / "final")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=k)


@pytest.mark.slow  # torchrun: 2 training processes
def test_bf16_mixed_precision_and_activation_checkpointing_under_fsdp(reference, tmp_path):
    """bf16 parameters with fp32 reductions (the CUDA path) and recomputed blocks, here on gloo."""
    config, ref = reference["dense"]
    r = torchrun(config, tmp_path / "bf16", "--set", "train.dtype=bf16", "--set", "train.activation_checkpointing=true")
    assert "(bf16)" in r.stderr
    got, want = records(tmp_path / "bf16"), records(ref)
    assert sorted(got) == sorted(want)
    # bf16 rounds every matmul input: close to fp32, but not equal (equal would mean bf16 was not applied).
    diffs = [abs(got[s]["loss"] - want[s]["loss"]) for s in want]
    assert max(diffs) < 2e-2 and max(diffs) > 1e-6, diffs
    from model import load_checkpoint

    assert load_checkpoint(tmp_path / "bf16" / "final").tok_embeddings.weight.dtype == torch.float32  # fp32 master


@pytest.mark.slow  # torchrun: 2 training processes
def test_checkpoint_of_two_processes_resumes_on_one_and_back(reference, tmp_path):
    config, ref = reference["dense"]
    out = tmp_path / "run"
    torchrun(config, out, "--set", "train.steps=6")  # saves step 4 and step 6 as DCP directories
    assert (out / "checkpoints" / "step_000006" / ".metadata").exists()
    r = mujina_train("--config", str(config), "--out", str(out), "--set", "train.steps=9",
                     "--set", "train.save_every=9")
    assert "resumed from" in r.stderr and "written by 2 process(es); continuing on 1" in r.stderr
    assert not (out / "checkpoints" / "step_000009" / ".metadata").exists()  # one process: safetensors
    # ...and a one-process checkpoint continues on two.
    r = torchrun(config, out)
    assert "resumed from" in r.stderr and "at step 9" in r.stderr
    assert_same_curve(records(out), records(ref))


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow  # torchrun: 2 training processes
def test_killed_process_restarts_the_job_from_its_last_checkpoint(reference, tmp_path):
    config, ref = reference["dense"]
    long = write_config(tmp_path / "long.yaml", BASE, steps=60, save_every=10, eval_every=30)
    # The uninterrupted curve, then the same run with one process killed by SIGKILL mid-run.
    mujina_train("--config", str(long), "--out", str(tmp_path / "whole"))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "model.train", "--config", str(long), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step_000010" / "config.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    victims = _children(proc.pid)
    assert len(victims) == 2, victims
    os.kill(victims[1], signal.SIGKILL)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the restarted job did not finish:\n{proc.communicate()[0][-5000:]}") from None
    assert proc.returncode == 0, log
    assert "resumed from" in log, log  # the restarted workers continued from a checkpoint, not step 0
    steps = records(out)
    assert sorted(steps) == list(range(1, 61))  # each step once: records after the checkpoint were dropped
    assert_same_curve(steps, records(tmp_path / "whole"))


@pytest.mark.slow  # torchrun: 2 training processes
def test_convert_turns_a_distributed_checkpoint_into_the_project_format(reference, tmp_path):
    config, _ = reference["moe"]
    out = tmp_path / "run"
    torchrun(config, out)
    step = out / "checkpoints" / "step_000012"
    r = mujina_model("convert", "--dcp", str(step), "--out", str(tmp_path / "converted"))
    assert "converted" in r.stdout
    from model import load_checkpoint

    a, b = load_checkpoint(tmp_path / "converted"), load_checkpoint(out / "final")
    ids = torch.randint(0, a.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(ids), b(ids))
    # The converted checkpoint is an ordinary one: upcycle/export read it.
    mujina_model("export", "--checkpoint", str(tmp_path / "converted"), "--out", str(tmp_path / "hf"))
    # Bad input: a missing directory, a directory that is not a distributed checkpoint.
    bad = mujina_model("convert", "--dcp", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    bad = mujina_model("convert", "--dcp", str(tmp_path / "converted"), "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "not a distributed checkpoint" in bad.stderr
    assert "already a safetensors" in bad.stderr


@pytest.mark.slow  # torchrun: 2 training processes
def test_bad_cluster_configs_fail_before_any_work(reference, tmp_path):
    config, _ = reference["dense"]
    # 8 sequences are a whole number of micro-batches of 8 on one process, but not on 2.
    r = torchrun(config, tmp_path / "a", "--set", "train.micro_batch_size=8", check=False)
    assert r.returncode != 0 and "not divisible by train.micro_batch_size=8 x 2 processes" in r.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()
    # A model that cannot fit in this machine's memory is refused before its weights are allocated.
    r = mujina_train("--config", str(config), "--out", str(tmp_path / "b"), "--set", "model.preset=tanuki-8b",
                     "--set", "model.max_seq_len=4096", check=False)
    assert r.returncode == 2 and "cannot fit" in r.stderr and "GiB" in r.stderr
    # Resuming a directory whose checkpoint holds another model.
    torchrun(config, tmp_path / "c", "--set", "train.steps=4")
    r = torchrun(config, tmp_path / "c", "--set", "model.hidden_size=128", check=False)
    assert r.returncode != 0 and "holds a different model" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun: 2 training processes
def test_rank_zero_reports_mfu_and_serves_prometheus_gauges(tmp_path):
    port = _free_port()
    # CPU has no peak-FLOPS entry: give one, as an operator of an unlisted device would.
    config = write_config(tmp_path / "c.yaml", BASE, steps=400, eval_every=0, save_every=0, log_every=1,
                          metrics_port=port, peak_tflops=0.5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model.train",
           "--config", str(config), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        text, deadline = "", time.monotonic() + 120
        while "mujina_train_mfu" not in text:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.1)
        samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("mujina_train_")}
        assert 'run="run"' in text
        assert samples["mujina_train_step"] >= 1 and samples["mujina_train_loss"] > 0
        assert samples["mujina_train_tokens_per_second"] > 0 and 0 < samples["mujina_train_mfu"] < 1
    finally:
        proc.kill()
        proc.wait()
    from model.parallel import flops_per_token

    last = list(records(tmp_path / "run").values())[-1]
    cfg_model = __import__("model").ModelConfig.from_dict(BASE["model"])
    expect = last["tokens_per_s"] / 2 * flops_per_token(cfg_model, 64) / 0.5e12
    assert last["mfu"] == pytest.approx(expect, rel=1e-9)


def test_flops_per_token_follows_the_formula():
    from model import ModelConfig
    from model.parallel import flops_per_token, memory_estimate

    dense = ModelConfig.from_dict({"preset": "tanuki-8b"})
    n = dense.num_params() - dense.vocab_size * dense.hidden_size  # the input embedding is a lookup
    assert flops_per_token(dense, 2048) == 6 * n + 12 * 32 * 4096 * 2048
    moe = ModelConfig.from_dict({"preset": "tanuki-8x8b"})
    n_active = moe.num_active_params() - moe.vocab_size * moe.hidden_size
    assert flops_per_token(moe, 2048) == 6 * n_active + 12 * 32 * 4096 * 2048
    assert flops_per_token(moe, 2048) < 0.3 * 6 * moe.num_params()  # only 2 of 8 experts count
    # FSDP shards the 16 bytes/parameter of training state over the processes.
    one = memory_estimate(dense, world_size=1, micro_batch=1, seq_len=2048, bf16=True, activation_checkpointing=True)
    eight = memory_estimate(dense, world_size=8, micro_batch=1, seq_len=2048, bf16=True, activation_checkpointing=True)
    assert one["state"] == 16 * dense.num_params() and eight["state"] == one["state"] / 8

"""The reference trainer through `python -m model.train`: it learns, logs what the issue names,
resumes exactly, splits batches without changing the loss, and fails clearly on bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import load_checkpoint
from tests.conftest import REPO, mujina_train, wait_until

DEBUG = str(REPO / "configs" / "debug.yaml")
QUICK = ["--set", "train.log_every=1", "--set", "train.eval_every=0"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return {r["step"]: r["loss"] for r in _records(out)}


def test_debug_config_learns_and_logs(tmp_path):
    # Relative --out resolves against the working directory.
    mujina_train("--config", DEBUG, "--out", "run", "--set", "train.steps=60", "--set", "train.eval_every=30",
                 "--set", "train.log_every=10", cwd=tmp_path)
    out = tmp_path / "run"
    recs = _records(out)
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 50, 60]
    for r in recs:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) and r["tokens_per_s"] > 0
    assert "eval_loss" in recs[2] and "eval_loss" in recs[-1]
    assert recs[-1]["loss"] < 0.6 * recs[0]["loss"]  # ln(512) = 6.2 at random init
    net = load_checkpoint(out / "final")
    assert net(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 512)


def _moe_init(tmp_path):
    from tests.conftest import mujina_model

    mujina_model("init", "--preset", "debug", "--out", str(tmp_path / "dense"))
    mujina_model("upcycle", "--checkpoint", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2",
                 "--noise-std", "0.01", "--out", str(tmp_path / "moe-init"))
    return tmp_path / "moe-init"


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.slow  # two training runs per model
def test_resume_from_checkpoint_reproduces_uninterrupted_losses(tmp_path, kind):
    # Reference: the same run, uninterrupted. A fresh directory holding only the step-8 checkpoint
    # is exactly what a run killed between steps 8 and 11 leaves behind.
    extra = ["--set", f"init_from={_moe_init(tmp_path)}", "--set", "model=null"] if kind == "moe" else []
    args = ["--config", DEBUG, *QUICK, "--set", "train.steps=20", "--set", "train.save_every=4",
            "--set", "train.keep_checkpoints=10", "--set", "train.micro_batch_size=8", *extra]
    mujina_train(*args, "--out", str(tmp_path / "full"))
    full = _losses(tmp_path / "full")
    assert len(full) == 20

    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000008", tmp_path / "cut" / "checkpoints" / "step_000008")
    r = mujina_train(*args, "--out", str(tmp_path / "cut"))
    assert "resumed from" in r.stderr and "step 8" in r.stderr
    resumed = _losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(9, 21))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=0, abs=1e-6), step
    a, b = load_checkpoint(tmp_path / "full" / "final"), load_checkpoint(tmp_path / "cut" / "final")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow  # four training runs, one killed
def test_killed_run_continues_where_it_stopped(tmp_path):
    args = ["--config", DEBUG, *QUICK, "--set", "train.steps=40", "--set", "train.save_every=2"]
    mujina_train(*args, "--out", str(tmp_path / "ref"))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "model.train", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    # polled often: the kill must land mid-run, long before step 40
    wait_until(lambda: (out / "checkpoints" / "step_000004").exists(), "the run's checkpoint of step 4", limit=120,
               every=0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = mujina_train(*args, "--out", str(out))
    assert "resumed from" in r.stderr
    ref, got = _losses(tmp_path / "ref"), _losses(out)
    assert sorted(got) == list(range(1, 41))  # every step logged exactly once
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=0, abs=1e-6), step
    again = mujina_train(*args, "--out", str(out))  # a finished run does nothing more
    assert "resumed from" in again.stderr and "step 40/40" not in again.stderr


@pytest.mark.slow
def test_accumulation_does_not_change_the_loss(tmp_path):
    base = ["--config", DEBUG, *QUICK, "--set", "train.steps=3", "--set", "train.batch_size=8"]
    mujina_train(*base, "--set", "train.micro_batch_size=8", "--out", str(tmp_path / "one"))
    mujina_train(*base, "--set", "train.micro_batch_size=2", "--out", str(tmp_path / "four"))
    one, four = _losses(tmp_path / "one"), _losses(tmp_path / "four")
    for step in one:
        assert four[step] == pytest.approx(one[step], rel=0, abs=1e-5)


@pytest.mark.slow
def test_token_file_source(tmp_path):
    # A flat uint16 file of a repeating pattern with a separator: the model learns it.
    pattern = np.array([5, 9, 12, 40, 3, 0], dtype=np.uint16)  # 0 ends each document
    np.tile(pattern, 4000).astype("<u2").tofile(tmp_path / "tokens.bin")
    mujina_train("--config", DEBUG, "--set", "data.source=tokens", "--set", f"data.path={tmp_path / 'tokens.bin'}",
                 "--set", "data.doc_sep_id=0", "--set", "data.eval_fraction=0.1", "--set", "train.steps=40",
                 "--set", "train.eval_every=40", "--set", "train.log_every=40", "--out", str(tmp_path / "run"))
    assert _records(tmp_path / "run")[-1]["eval_loss"] < 1.0


def test_nan_loss_stops_with_a_clear_error_and_finite_checkpoints(tmp_path):
    r = mujina_train("--config", DEBUG, *QUICK, "--set", "optim.lr=1e30", "--set", "optim.min_lr=0",
                     "--set", "optim.warmup_steps=0", "--set", "optim.grad_clip=0", "--set", "train.save_every=1",
                     "--set", "train.steps=50", "--out", str(tmp_path / "run"), check=False)
    assert r.returncode == 2
    assert "non-finite" in r.stderr and "Lower optim.lr" in r.stderr
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step_*"):
        net = load_checkpoint(ckpt)
        assert all(torch.isfinite(p).all() for p in net.parameters()), ckpt


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=5", "not divisible"),
    ("train.stepz=5", "unknown key(s) in train: stepz"),
    ("model.preset=huge", "unknown preset 'huge'"),
    ("data.seq_len=1000", "exceeds the model's max_seq_len"),
    ("data.source=tokens", "data.path is not set"),
    ("train.phase=pre train", "train.phase must be 1-32 letters"),
])
@pytest.mark.slow  # one `python -m model.train` per case
def test_bad_config_fails_before_training(tmp_path, override, message):
    r = mujina_train("--config", DEBUG, "--set", override, "--out", str(tmp_path / "run"), check=False)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resuming_with_a_different_model_is_refused(tmp_path):
    args = ["--config", DEBUG, *QUICK, "--set", "train.steps=2", "--out", str(tmp_path / "run")]
    mujina_train(*args)
    r = mujina_train(*args, "--set", "model.num_layers=3", check=False)
    assert r.returncode == 2 and "different model" in r.stderr


def test_warmup_then_cosine_schedule_and_progress_line(tmp_path):
    # Reference: the schedule written out by hand (linear warmup to lr, cosine to min_lr at the last step).
    import math

    from model.train import OptimConfig, lr_at

    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, o, 100) == pytest.approx(1e-4) and lr_at(9, o, 100) == pytest.approx(1e-3)
    assert lr_at(55, o, 100) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, o, 100) == pytest.approx(1e-4)
    r = mujina_train("--config", DEBUG, *QUICK, "--set", "train.steps=4", "--set", "optim.warmup_steps=2",
                     "--out", str(tmp_path / "run"))
    lrs = [rec["lr"] for rec in _records(tmp_path / "run")]
    assert lrs[:2] == pytest.approx([1.5e-3, 3e-3]) and lrs[2] > lrs[3]  # debug.yaml: lr 3e-3
    assert "step 4/4 | loss" in r.stderr and "tok/s" in r.stderr

"""Shared test helpers. Tests drive the public commands as subprocesses where the issue names a
command, so what is tested is what a user runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Two cores: one intra-op thread per process keeps subprocess-heavy tests from oversubscribing.
torch.set_num_threads(1)


def run_cli(*args: str, check: bool = True, timeout: float = 300, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m MODULE args...` (MODULE = model.cli or model.train) and return the result."""
    proc = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
        cwd=cwd or REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                             f"stderr:\n{proc.stderr}")
    return proc


def wait_until(predicate, what: str, limit: float = 30.0, every: float = 0.2) -> None:
    """Poll `predicate()` every `every` seconds until it is true; fail naming `what` after `limit` seconds.

    For state driven by other threads and processes (a server's sweeper, a daemon's log, a scrape). The limit
    only bounds a broken run: tests never assert on how long the wait took. A predicate may raise to fail at
    once (a process it waits on exited)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}")


def mujina_model(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("model.cli", *args, **kw)


def mujina_train(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("model.train", *args, **kw)


@pytest.fixture
def tiny_moe_cfg():
    from model import ModelConfig

    return ModelConfig.from_dict({"preset": "debug", "num_kv_heads": 2, "rope_theta": 5000.0,
                                  "moe": {"num_experts": 4, "top_k": 2}})


# The tiny MoE of the swarm tests (tests/swarm, tests/coordinator, tests/worker): one layer, 4 experts, top-2.
TINY = dict(preset="debug", num_layers=1, hidden_size=32, intermediate_size=64, vocab_size=64, max_seq_len=64,
            moe=dict(num_experts=4, top_k=2))


def tiny_model(seed: int = 0):
    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_dict(TINY))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from model.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "moe", tiny_model())

"""Fixtures for the worker: a real coordinator on loopback (SQLite), worker daemons as subprocesses,
an eval checkpoint + shard in the coordinator's state directory, and a tiny teacher (see teacher.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.coordinator.conftest import TOKEN, Coord


@pytest.fixture
def coord(tmp_path):
    c = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}")
    yield c
    c.close()


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def spawn_worker(target: str, cache_dir: Path, *args: str, token: str = TOKEN, log: Path | None = None):
    """`mujina-worker run` as a subprocess (stdout+stderr to `log`)."""
    cmd = [sys.executable, "-m", "worker.cli", "run", "--coordinator", target, "--token", token,
           "--cache-dir", str(cache_dir), "--no-benchmark", *args]
    out = open(log or cache_dir.with_suffix(".log"), "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=out, stderr=subprocess.STDOUT)


def run_worker(target: str, cache_dir: Path, *args: str, timeout: float = 120, **kw) -> str:
    """Run a worker to the end (--max-tasks/--once); returns its log, raising if it exited non-zero."""
    log = cache_dir.with_suffix(".log")
    proc = spawn_worker(target, cache_dir, *args, log=log, **kw)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"worker did not finish:\n{log.read_text()}") from None
    text = log.read_text()
    assert rc == 0, f"worker exited {rc}:\n{text}"
    return text


def make_eval_inputs(state_dir: Path, seed: int = 0) -> dict:
    """A tiny checkpoint (checkpoints/tiny/) and a shard of random tokens (shards/eval/NAME.bin)."""
    import torch

    from data_shards.shards import write_shard
    from model import ModelConfig, Transformer
    from model.checkpoint import save_checkpoint

    cfg = ModelConfig.from_dict({"preset": "debug"})
    torch.manual_seed(seed)
    net = Transformer(cfg)
    save_checkpoint(state_dir / "checkpoints" / "tiny", net)
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (40, 70, 5)]
    (state_dir / "shards" / "eval").mkdir(parents=True)
    name, tokens, _ = write_shard(state_dir / "shards" / "eval", docs, cfg.vocab_size)
    return {"net": net, "docs": docs, "payload": {"checkpoint": "tiny", "shard": f"eval/{name}",
                                                  "shard_tokens": tokens, "seq_len": 32}}


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """The tiny bigram teacher (tests/worker/teacher.py), built once per session."""
    from tests.data_shards.corpus import japanese_documents
    from tests.worker.teacher import build_teacher

    return build_teacher(tmp_path_factory.mktemp("teacher") / "tiny", japanese_documents(30, seed=3))


@pytest.fixture(scope="session")
def shard_tokenizer(tmp_path_factory):
    """A SentencePiece tokenizer (data_shards) for sharding accepted synthetic records."""
    from data_shards.tokenizer import TokenizerTrainConfig, train_tokenizer
    from tests.data_shards.corpus import japanese_documents

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(japanese_documents(60, seed=4), out, TokenizerTrainConfig(vocab_size=1200, mecab=False, threads=1))
    return out


def synthetic_section(tmp_path: Path, teacher: Path, tokenizer: Path | None = None, **over) -> dict:
    from tests.data_shards.corpus import japanese_documents, write_jsonl

    seeds = write_jsonl(tmp_path / "seeds.jsonl", japanese_documents(4, seed=5))
    sec = {"personas": [str(REPO / "configs" / "personas.ja.yaml")], "seeds": [str(seeds)], "languages": ["ja"],
           "templates": ["qa", "summary"], "teacher": {"name": "tiny", "path": str(teacher)},
           "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 60, "seed": 0},
           "batch_size": 4, "judge_batch_size": 8, "max_prompts": 8, "min_output_chars": 20}
    if tokenizer is not None:
        sec["tokenizer"] = str(tokenizer)
    sec.update(over)
    return sec


@pytest.fixture
def serve():
    """start(servicer) -> "127.0.0.1:PORT": a gRPC server with that Coordinator servicer (tests/worker/hostile.py)."""
    import grpc

    from coordinator.api import mujina_pb2_grpc as pb_grpc

    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)

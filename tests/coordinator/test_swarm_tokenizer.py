"""Swarm round checkpoints keep the run's tokenizer (issue 19, item 10): `init-swarm` of an upcycled checkpoint
with a tokenizer, a round closed by the real driver, then `mujina-model export` of that round and
`mujina-model sample --prompt` (which needs the tokenizer files), all through the CLIs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import mujina_model
from tests.coordinator.conftest import coordinator_cli, write_project


def _word_tokenizer(directory, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


@pytest.mark.slow  # CLI subprocesses (init-swarm, export, sample) and a round closed by the driver
def test_export_of_a_swarm_round_samples_from_text(tiny_checkpoint, tmp_path):
    from coordinator.config import load_project
    from coordinator.scheduler import Scheduler
    from coordinator.store import Store
    from coordinator.swarm_driver import SwarmDriver
    from model.checkpoint import load_config

    _word_tokenizer(tiny_checkpoint / "tokenizer", load_config(tiny_checkpoint).vocab_size)
    # the deadlines are tiny so that the driver closes round 0 at its next step (with no upload: the merged
    # model is round 0's); what is tested is what a round checkpoint carries
    project = write_project(tmp_path, swarm={"rounds": 2, "inner_steps": 1, "batch_size": 2, "micro_batch_size": 2,
                                             "seq_len": 16,
                                             "round_timeout_s": 0.001, "join_timeout_s": 0.001})
    out = coordinator_cli("init-swarm", "--config", str(project), "--checkpoint", str(tiny_checkpoint)).stdout
    assert "starts from checkpoints/test/round_000000" in out
    cfg = load_project(project)
    rounds = cfg.state_dir / "checkpoints" / "test"
    assert (rounds / "round_000000" / "tokenizer" / "tokenizer.json").is_file()

    store = Store.open(cfg.db_url())
    sched = Scheduler(store, cfg)
    store.add_token("alice", "tok_alice")
    caps = {"devices": [{"kind": "cpu", "name": "cpu", "memory_bytes": 0}], "host_memory_bytes": 8 * 2**30}
    sched.register("tok_alice", "alice", caps, 0, False, 1.0)
    driver = SwarmDriver(cfg, store, sched)
    driver.step()   # opens round 0 (one slot)
    driver.step()   # its deadline passed: the slot is cancelled and the round closes
    store.close()
    status = json.loads((cfg.state_dir / "swarm" / "test.json").read_text())
    assert status["round"] == 1 and status["checkpoint"] == "test/round_000001"
    assert (rounds / "round_000001" / "tokenizer" / "tokenizer.json").is_file()

    hf = tmp_path / "hf"
    mujina_model("export", "--checkpoint", str(rounds / "round_000001"), "--out", str(hf))
    sample = json.loads(mujina_model("sample", "--hf", str(hf), "--prompt", "w1 w2 w3", "--max-new-tokens",
                                     "3").stdout)
    assert len(sample["generated_ids"]) == 3 and isinstance(sample["text"], str)
    assert "round 2 of 2 (1 closed" in coordinator_cli("status", "--config", str(project)).stdout

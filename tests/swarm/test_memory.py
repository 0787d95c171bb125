"""The memory model against the measured peak RSS of a real round, for two assignment sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer
from swarm.memory import estimate_round_memory, experts_that_fit
from swarm.round import build_inner_optimizer
from swarm.settings import InnerConfig

# Expert-heavy on purpose (0.79M parameters per expert) so the assignment, not the interpreter, sets the peak.
CFG = dict(preset="debug", num_layers=2, hidden_size=128, intermediate_size=2048, vocab_size=256, max_seq_len=64,
           moe=dict(num_experts=8, top_k=2))


@pytest.mark.slow  # a memory-probe subprocess per assignment size
def test_predicted_peak_rss_is_within_15_percent_for_two_assignment_sizes(tmp_path):
    cfg = ModelConfig.from_dict(CFG)
    with torch.device("meta"):
        net = Transformer(cfg)
    net.to_empty(device="cpu")
    net.init_weights()
    ckpt = save_checkpoint(tmp_path / "moe", net)
    del net
    measured, predicted = {}, {}
    for k in (2, 8):
        out = subprocess.run([sys.executable, "-m", "tests.swarm.memory_probe", str(ckpt), str(k)], check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        got = json.loads(out.stdout.strip().splitlines()[-1])
        est = estimate_round_memory(cfg, k, micro_batch_size=2, seq_len=32, averaging=False, base_bytes=got["base"])
        measured[k], predicted[k] = got["peak"], est.total
        assert abs(est.total - got["peak"]) <= 0.15 * got["peak"], (k, est, got)
    # The part the assignment adds (6 more experts in each of 2 layers) is predicted as closely.
    grow_measured, grow_predicted = measured[8] - measured[2], predicted[8] - predicted[2]
    assert abs(grow_predicted - grow_measured) <= 0.15 * grow_measured, (grow_predicted, grow_measured)


def test_experts_that_fit_a_budget():
    cfg = ModelConfig.from_dict(CFG)
    kw = dict(micro_batch_size=2, seq_len=32)
    two, four = (estimate_round_memory(cfg, k, **kw).total for k in (2, 4))
    assert experts_that_fit(cfg, four, **kw) == 4
    assert experts_that_fit(cfg, four - 1, **kw) == 3
    assert experts_that_fit(cfg, two - 1, **kw) == 0
    assert estimate_round_memory(cfg, 4, optimizer="adamw8bit", **kw).optimizer * 4 == \
        estimate_round_memory(cfg, 4, **kw).optimizer
    with pytest.raises(ValueError, match="experts_per_layer"):
        estimate_round_memory(cfg, 1, **kw)


def test_8bit_adamw_needs_cuda_and_bitsandbytes_with_a_clear_error():
    net = Transformer(ModelConfig.from_dict({**CFG, "intermediate_size": 32}))
    with pytest.raises(ValueError, match="CUDA"):
        build_inner_optimizer(net, InnerConfig(optimizer="adamw8bit"))
    if not torch.cuda.is_available():
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install bitsandbytes"):
            build_inner_optimizer(net.cuda(), InnerConfig(optimizer="adamw8bit", device="cuda"))

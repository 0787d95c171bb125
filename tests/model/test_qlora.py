"""QLoRA (model/qlora.py): LoRA on a base stored in NF4 by bitsandbytes, on CPU. Each test names its reference:
the unquantised LoRA network whose weights are the dequantised NF4 weights (the forward, the gradients, the
reference with adapters off), ln 2 at the start of DPO, the uninterrupted run for resumption, the unmerged
network for the merged final. The CUDA test (step-0 ln 2, peak memory against bf16 LoRA) is in tests/gpu."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import shutil
import sys
import weakref

import pytest
import torch
import yaml

from model import ModelConfig
from model.lora import LoraSpec, adapters_disabled, add_lora, lora_modules
from model.transformer import Transformer
from tests.conftest import mujina_train
from tests.model.test_posttrain import dpo_config, records, world  # noqa: F401 (world: the module fixture)

if importlib.util.find_spec("bitsandbytes") is None:  # not importorskip: model/qlora.py imports it (no Hub call)
    pytest.skip("QLoRA needs bitsandbytes", allow_module_level=True)

from model.qlora import (  # noqa: E402 (after the skip)
    NF4Linear,
    NF4LoraLinear,
    NF4MoE,
    _DenseWhileRunning,
    bitsandbytes,
    dequantize,
    dequantized_state_dict,
    nf4,
    nf4_bytes,
    quantize_base,
)

DENSE = {"preset": "debug", "num_kv_heads": 2, "rope_theta": 5000.0}
MOE = {**DENSE, "moe": {"num_experts": 4, "top_k": 2}}
SPEC = LoraSpec(r=4, alpha=8, targets=("wq", "wv", "w1", "w2", "experts"))  # wk, wo, w3: NF4 without adapters


def lora_net(cfg: dict) -> Transformer:
    """A LoRA network whose B factors are random too (a fresh B is zero, which would hide every bug)."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_dict(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    add_lora(net, SPEC, generator=g)
    with torch.no_grad():
        for m in lora_modules(net):
            for name, p in m.named_parameters():
                if "B" in name:
                    p.normal_(0.0, 0.05, generator=g)
    return net


def dequantized_twin(net: Transformer) -> Transformer:
    """The reference: an ordinary LoRA network holding the quantised network's dequantised weights."""
    ref = Transformer(net.cfg).eval()
    add_lora(ref, SPEC)
    ref.load_state_dict(dequantized_state_dict(net), strict=True)
    return ref


def ids(vocab: int, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_the_quantised_network_is_its_dequantised_twin_and_only_adapters_train(cfg):
    net = lora_net(cfg)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    quantize_base(net)
    ref = dequantized_twin(net)
    x = ids(net.cfg.vocab_size)
    got, want = net(x), ref(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad(), adapters_disabled(net), adapters_disabled(ref):  # DPO's reference
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-6)
    got.square().mean().backward()
    want.square().mean().backward()
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained)  # the adapters alone train
    assert {n for n, p in net.named_parameters() if p.grad is not None} == set(trained)
    theirs = dict(ref.named_parameters())
    for n, p in trained.items():
        torch.testing.assert_close(p.grad, theirs[n].grad, rtol=0, atol=1e-6)
    # what is quantised, and what is kept (embeddings, norms, output head, router)
    kinds = {type(m) for m in net.modules()}
    assert NF4Linear in kinds and NF4LoraLinear in kinds and (NF4MoE in kinds) == ("moe" in cfg)
    state = dequantized_state_dict(net)
    for k in ("tok_embeddings.weight", "norm.weight", "output.weight", "layers.0.attention_norm.weight"):
        assert torch.equal(state[k], original[k]), k
    if "moe" in cfg:
        router = "layers.0.feed_forward.router.weight"
        assert torch.equal(state[router], original[router])
    quantised = [k for k in state if not torch.equal(state[k], original[k])]
    assert all(k.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight",
                           "w3.weight", "_EFD", "_EDF")) for k in quantised), quantised
    # NF4 with double quantisation: ~4.13 bits a weight, so under 1/7 of the fp32 bytes it replaces
    fp32 = sum(original[k].numel() * 4 for k in quantised)
    assert nf4_bytes(net) < fp32 / 7


def test_nf4_is_deterministic_per_expert_and_close_to_the_weights():
    torch.manual_seed(0)
    w = torch.randn(4, 96, 64) * 0.02
    a, b = nf4(w[1]), nf4(w[1].clone())
    assert torch.equal(a.data, b.data) and torch.equal(dequantize(a), dequantize(b))  # a resume rebuilds the base
    net = Transformer(ModelConfig.from_dict(MOE))
    add_lora(net, SPEC)
    stacked = net.layers[0].feed_forward.w1_EFD.detach().clone()
    quantize_base(net)
    moe = net.layers[0].feed_forward
    for e in range(stacked.shape[0]):  # expert e's matrix is its own NF4 tensor
        assert torch.equal(dequantize(moe.w1_nf4[e]), dequantize(nf4(stacked[e])))
    err = (dequantize(a) - w[1]).abs()
    assert err.max() <= 0.2 * w[1].abs().max() and err.mean() <= 0.1 * w[1].abs().mean() + 1e-4


class Tracking(_DenseWhileRunning):
    """Remembers (weakly) every dense weight a layer dequantised, and counts backward's remakes."""

    def __init__(self):
        super().__init__()
        self.made, self.remade = [], 0

    def dequantize(self, make):
        w = super().dequantize(make)
        self.made.append(weakref.ref(w))
        return w

    def _unpack(self, saved):
        self.remade += not isinstance(saved, torch.Tensor)
        return super()._unpack(saved)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_no_dense_weight_outlives_its_layer_backward_dequantises_again(cfg):
    net = quantize_base(lora_net(cfg))
    trackers = {}
    for name, m in net.named_modules():
        if isinstance(m, NF4Linear | NF4LoraLinear | NF4MoE):
            m._running = trackers[name] = Tracking()
    loss = net(ids(net.cfg.vocab_size)).square().mean()  # the graph is alive: it holds what backward needs
    gc.collect()
    made = [r for t in trackers.values() for r in t.made]
    assert made and all(r() is None for r in made)  # ... and no dense weight among it
    loss.backward()
    # every quantised layer of the last block remade its weights in backward (the first block's wq wk wv
    # need none: their input, the frozen embeddings, wants no gradient)
    last = {n: t.remade for n, t in trackers.items() if n.startswith(f"layers.{net.cfg.num_layers - 1}.")}
    assert len(last) >= 4 and all(last.values()), last


def test_bitsandbytes_is_imported_without_the_hub_kernel_lookup():
    had = "kernels" in sys.modules
    bnb = bitsandbytes()
    assert bnb.__version__ >= "0.50"  # the CPU backend this module documents
    # bitsandbytes' CPU backend tries `from kernels import get_kernel` and a Hub download on AVX512-BF16 CPUs;
    # model/qlora.py makes that import fail, so the `kernels` package never loads and nothing is fetched
    assert had or "kernels" not in sys.modules


class Handing(_DenseWhileRunning):
    """Counts what the layer's hook keeps itself (plain tensors) and what it hands to the hooks outside."""

    def __init__(self):
        super().__init__()
        self.kept = self.handed = 0

    def _pack(self, t):
        saved = super()._pack(t)
        self.kept += isinstance(saved, torch.Tensor)
        self.handed += type(saved).__name__ == "_Outer"
        return saved


def test_activation_checkpointing_recomputes_the_quantised_layers_activations_too():
    from model.parallel import apply_activation_checkpointing

    plain, ckpt = quantize_base(lora_net(MOE)), apply_activation_checkpointing(quantize_base(lora_net(MOE)))
    hooks, control = [], []
    for net, found in ((ckpt, hooks), (plain, control)):
        for m in net.modules():
            if isinstance(m, NF4MoE):
                m._running = Handing()
                found.append(m._running)
    x = ids(plain.cfg.vocab_size)
    plain(x).square().mean().backward()
    ckpt(x).square().mean().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):  # the reference: no checkpointing
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6)
    # the MoE's activations went to checkpointing's hooks (recomputed in backward), none stayed in the graph
    assert hooks and all(h.handed > 0 and h.kept == 0 for h in hooks), [(h.handed, h.kept) for h in hooks]
    assert all(h.handed == 0 and h.kept > 0 for h in control)  # without checkpointing they stay, as they should


def test_quantize_base_takes_a_lora_network_once():
    net = Transformer(ModelConfig.from_dict(DENSE))
    with pytest.raises(ValueError, match="add_lora freezes the base first"):
        quantize_base(net)
    add_lora(net, SPEC)
    quantize_base(net)
    with pytest.raises(ValueError, match="quantised already"):
        quantize_base(net)
    with pytest.raises(ValueError, match="dequantized_state_dict"):
        net.layers[0].attention.wq.merged()


# ---- through mujina-train --------------------------------------------------------------------------

def qlora_config(world, path, **train):  # noqa: F811 (world is the fixture)
    config = yaml.safe_load(dpo_config(world, path, "lora", **train).read_text())
    config["finetune"]["mode"] = "qlora"
    path.write_text(yaml.safe_dump(config))
    return path


def test_qlora_dpo_starts_at_ln2_on_the_quantised_reference(world, tmp_path):  # noqa: F811
    config = qlora_config(world, tmp_path / "q.yaml", steps=2, eval_every=0, save_every=0)
    r = mujina_train("--config", str(config), "--out", str(tmp_path / "run"))
    assert "qlora on CPU" in r.stderr
    first, second = records(tmp_path / "run")[1], records(tmp_path / "run")[2]
    assert abs(first["loss"] - math.log(2)) <= 1e-6  # the reference is the same quantised base, adapters off
    assert first["rewards/margins"] == 0.0 and second["rewards/margins"] != 0.0  # and then the adapters train


@pytest.mark.parametrize("mode", ["full", "qlora"])
def test_the_memory_check_counts_a_qlora_base_at_4_bits(tmp_path, mode):
    """A model too big for any host (6e12 weights): the refusal states QLoRA's frozen NF4 base (model/qlora.py's
    base_bytes, about 0.52 bytes a weight), not full training's 16 bytes of weights, gradients and moments."""
    from model.qlora import base_bytes
    from model.train import RunConfig, Trainer

    model = {"preset": "debug", "num_layers": 400, "hidden_size": 32768, "intermediate_size": 131072,
             "num_heads": 256, "num_kv_heads": 8, "vocab_size": 32000, "max_seq_len": 256}
    cfg = RunConfig.from_dict({"model": model, "finetune": {"mode": mode}, "out": str(tmp_path / "run"),
                               "data": {"source": "synthetic", "seq_len": 64}, "train": {"device": "cpu"}})
    with pytest.raises(ValueError, match="this run cannot fit") as e:
        Trainer(cfg)
    mcfg = cfg.model_config()
    state = base_bytes(mcfg) if mode == "qlora" else 16.0 * mcfg.num_params()
    assert f"AdamW state {state / 2**30:.1f} GiB" in str(e.value), str(e.value)


@pytest.mark.slow  # three in-process trainers (about 8 s)
def test_a_qlora_run_is_the_lora_run_on_the_dequantised_base(world, tmp_path):  # noqa: F811
    """The trainer end to end (pretraining objective, synthetic data, in-process): QLoRA from a base equals LoRA
    from that base's dequantised NF4 weights, step for step (the same adapters' init, forward and gradients)."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.train import RunConfig, Trainer

    net = load_checkpoint(world / "base")
    add_lora(net, SPEC)
    state = dequantized_state_dict(quantize_base(net))
    plain = load_checkpoint(world / "base")
    plain.load_state_dict({k: v for k, v in state.items() if "lora" not in k})
    save_checkpoint(tmp_path / "dequantized", plain)
    losses = {}
    runs = (("qlora", world / "base", False), ("lora", tmp_path / "dequantized", False),
            ("qlora", world / "base", True))  # and QLoRA under activation checkpointing
    for mode, base, ac in runs:
        cfg = {"init_from": str(base), "finetune": {"mode": mode, "r": 4, "alpha": 8, "targets": list(SPEC.targets)},
               "data": {"source": "synthetic", "seq_len": 32}, "optim": {"lr": 1e-2, "warmup_steps": 1},
               "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "eval_every": 0, "dtype": "fp32",
                         "save_every": 0, "log_every": 1, "activation_checkpointing": ac},
               "out": str(tmp_path / f"{mode}{ac}")}
        trainer = Trainer(RunConfig.from_dict(cfg))
        losses[mode, ac] = [trainer.train_step()["loss"] for _ in range(3)]
        moved = [p for n, p in trainer.model.named_parameters() if "lora_B" in n or "_B_" in n]
        assert moved and all(p.abs().max() > 0 for p in moved)  # every B started at zero and trained
    assert losses["qlora", False] == losses["lora", False] == losses["qlora", True], losses


@pytest.mark.slow  # a CLI run that imports bitsandbytes (about 5 s)
def test_qlora_with_compile_exits_2_with_the_fix(world, tmp_path):  # noqa: F811
    config = yaml.safe_load(qlora_config(world, tmp_path / "q.yaml").read_text())
    config["train"]["compile"] = True
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(config))
    r = mujina_train("--config", str(tmp_path / "q.yaml"), "--out", str(tmp_path / "run"), check=False)
    assert r.returncode == 2 and "set train.compile: false" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow  # two 8-step QLoRA DPO runs and a resumed one (about 15 s)
def test_qlora_resumes_exactly_and_its_final_is_merged_into_the_dequantised_base(world, tmp_path):  # noqa: F811
    from model.checkpoint import load_checkpoint
    from model.finetune import load_lora_checkpoint
    from model.preference import PreferenceData

    config = qlora_config(world, tmp_path / "q.yaml", steps=8, save_every=4, eval_every=8)
    mujina_train("--config", str(config), "--out", str(tmp_path / "straight"))
    # the checkpoint is an ordinary LoRA one (base dequantised, fp32); final/ is it merged
    step8 = tmp_path / "straight" / "checkpoints" / "step_000008"
    assert json.loads((step8 / "lora.json").read_text())["r"] == 8
    data = PreferenceData(world / "dpo.jsonl", world / "tok", 96, 0, 0.2, 600)
    pairs = data.micro_batches("eval", 0, 1, 8)[0]
    final, lora = load_checkpoint(tmp_path / "straight" / "final").eval(), load_lora_checkpoint(step8).eval()
    with torch.no_grad():
        torch.testing.assert_close(final(pairs.input_ids), lora(pairs.input_ids), rtol=0, atol=1e-5)
    # a run that lost everything after its step-4 checkpoint, started again, gives the uninterrupted curve
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for gone in ("checkpoints/step_000008", "final"):
        shutil.rmtree(tmp_path / "resumed" / gone)
    r = mujina_train("--config", str(config), "--out", str(tmp_path / "resumed"))
    assert "resumed from" in r.stderr
    got, want = records(tmp_path / "resumed"), records(tmp_path / "straight")
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        for key in ("loss", "grad_norm", "rewards/margins", "eval_loss"):
            if key in want[step]:
                assert abs(got[step][key] - want[step][key]) <= 1e-6, (step, key)
    # resuming onto another base is refused, naming the weight
    other = tmp_path / "other_base"
    base = load_checkpoint(world / "base")
    with torch.no_grad():
        base.layers[0].attention.wk.weight.mul_(1.5)
    from model.checkpoint import save_checkpoint

    save_checkpoint(other, base, tokenizer_dir=world / "tok")
    moved = yaml.safe_load(config.read_text())
    moved["finetune"]["init_from"] = str(other)
    moved["train"]["steps"] = 12
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(moved))
    r = mujina_train("--config", str(tmp_path / "moved.yaml"), "--out", str(tmp_path / "resumed"), check=False)
    assert r.returncode != 0 and "layers.0.attention.wk.weight differs" in r.stderr, r.stderr

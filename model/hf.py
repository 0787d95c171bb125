"""Conversion between mujina checkpoints and Hugging Face `LlamaForCausalLM` / `MixtralForCausalLM`.

Both directions are renamings (our rotary layout is Hugging Face's), except that MoE experts
are stacked tensors here and separate per-expert tensors there. Export writes the legacy
Mixtral key names (`block_sparse_moe.experts.{j}.w1/w2/w3.weight`), which every transformers
version reads; import also accepts the fused in-memory layout of transformers >= 5
(`mlp.experts.gate_up_proj` [E, 2F, D], gate half first; `mlp.experts.down_proj` [E, D, F]).

Export streams one tensor at a time through `safe_open`, so a 47B checkpoint is converted
with memory for one output shard, not the whole model. The checkpoint's tokenizer files travel with
it, and its tokenizer_config.json gets the project's chat template (`chat_template()`, the format of
data_shards/chat.py) unless it has one, so an export serves as a synthetic-data teacher as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import CONFIG, TOKENIZER, WEIGHTS, load_config, write_json
from .config import ModelConfig, MoEConfig

# mujina name (per layer) -> Hugging Face name (per layer), shared by Llama and Mixtral.
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_DENSE_FFN = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_EXPERT = {"feed_forward.w1_EFD": "w1", "feed_forward.w3_EFD": "w3", "feed_forward.w2_EDF": "w2"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- export --------------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, dtype: torch.dtype, special_ids: dict[str, int | None]) -> dict[str, Any]:
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        # Written both ways: `rope_theta` for transformers < 5 and other readers, `rope_parameters` for
        # transformers >= 5. Leaving it out would silently give the reader's default (10000 or 1e6).
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        **special_ids,
    }
    if cfg.moe is None:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "attention_bias": False, "mlp_bias": False, **common}
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k,
            "router_aux_loss_coef": cfg.moe.aux_loss_coef, "output_router_logits": False,
            "router_jitter_noise": 0.0, "sliding_window": None, **common}


def iter_hf_tensors(ckpt_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) for every weight, reading one tensor at a time."""
    with safe_open(str(ckpt_dir / WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if key in _TOP:
                yield _TOP[key], f.get_tensor(key)
                continue
            m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
            if m is None:
                raise ValueError(f"unexpected weight {key!r} in {ckpt_dir / WEIGHTS}")
            i, rest = m.group(1), m.group(2)
            prefix = f"model.layers.{i}."
            if rest in _LAYER:
                yield prefix + _LAYER[rest], f.get_tensor(key)
            elif rest in _DENSE_FFN:
                yield prefix + _DENSE_FFN[rest], f.get_tensor(key)
            elif rest == "feed_forward.router.weight":
                yield prefix + "block_sparse_moe.gate.weight", f.get_tensor(key)
            elif rest in _EXPERT:
                sl = f.get_slice(key)
                for j in range(sl.get_shape()[0]):
                    yield prefix + f"block_sparse_moe.experts.{j}.{_EXPERT[rest]}.weight", sl[j]
            else:
                raise ValueError(f"unexpected weight {key!r} in {ckpt_dir / WEIGHTS}")
    # Tied models store no output.weight (see save_checkpoint): transformers re-ties from config.


def parse_size(text: str | int) -> int:
    """'5GB', '500MiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}: use e.g. 5GB, 500MiB or a number of bytes")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def export_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a transformers-loadable directory; returns it. dtype: float32 | bfloat16 | float16."""
    ckpt_dir, out = Path(ckpt_dir), Path(out_dir)
    cfg = load_config(ckpt_dir)
    limit = parse_size(max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()  # never mix shards of two exports

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    out_dtype = DTYPES[dtype] if dtype else None
    stored_dtype = None
    written: list[str] = []

    def flush() -> None:
        name = f"model-{len(written) + 1:05d}.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        written.append(name)

    weight_map: dict[str, int] = {}
    for name, t in iter_hf_tensors(ckpt_dir):
        stored_dtype = stored_dtype or t.dtype
        t = t.to(out_dtype).contiguous() if out_dtype else t.contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            flush()
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
        weight_map[name] = len(written)
    if len(written) == 0:  # everything fits one file: the plain, unsharded name
        save_file(shards[-1], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        flush()
        n = len(written)
        final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, fin in zip(written, final, strict=True):
            os.replace(out / tmp, out / fin)
        write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {k: final[v] for k, v in sorted(weight_map.items())},
        })

    special = _copy_tokenizer(ckpt_dir / TOKENIZER, out)
    add_chat_template(out)
    write_json(out / "config.json", hf_config(cfg, out_dtype or stored_dtype or torch.float32, special))
    gen = {k: v for k, v in special.items() if v is not None}
    write_json(out / "generation_config.json", {"_from_model_config": True, **gen})
    return out


def _copy_tokenizer(src: Path, out: Path) -> dict[str, int | None]:
    """Copy tokenizer files; return bos/eos/pad ids found in the tokenizer config, if any."""
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if not src.is_dir():
        return ids
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    meta = src / "mujina_special_ids.json"  # written by data_shards' tokenizer trainer
    if meta.exists():
        ids.update({k: v for k, v in json.loads(meta.read_text()).items() if k in ids})
    return ids


def chat_template() -> str:
    """The project's chat format (data_shards/chat.py: each turn `<|role|>content<|end|>`, the answer after
    `<|assistant|>`) as a Jinja chat template for transformers' apply_chat_template.

    BOS is not written: the project's tokenizer never maps text to BOS (split_special_tokens), so a `<s>` in
    the template would become five characters, not the token; generation starts at the first turn."""
    from data_shards.chat import ROLES, ChatTemplate

    markers = ChatTemplate()
    turns = "".join(f"{'{% if' if i == 0 else '{% elif'} m['role'] == '{role}' %}}{getattr(markers, role)}"
                    for i, role in enumerate(ROLES))
    return ("{% for m in messages %}" + turns
            + "{% else %}{{ raise_exception('unknown chat role ' + m['role'] + ': use system, user or assistant') }}"
            + "{% endif %}{{ m['content'] }}" + markers.end + "{% endfor %}"
            + "{% if add_generation_prompt %}" + markers.assistant + "{% endif %}")


def add_chat_template(hf_dir: Path) -> bool:
    """Give an exported tokenizer the project's chat template (in tokenizer_config.json) unless it has one.
    Returns whether it was added; a directory without tokenizer files is left alone."""
    conf_path = hf_dir / "tokenizer_config.json"
    if conf_path.exists():
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    elif (hf_dir / "tokenizer.json").exists():
        conf = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        return False
    if conf.get("chat_template") or (hf_dir / "chat_template.jinja").exists():
        return False
    conf["chat_template"] = chat_template()
    write_json(conf_path, conf)
    return True


# ---- import --------------------------------------------------------------------------------------

def _read_hf_config(hf_dir: Path) -> ModelConfig:
    path = hf_dir / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json: is it a Hugging Face model directory?")
    c = json.loads(path.read_text())
    kind = c.get("model_type")
    if kind not in ("llama", "mixtral"):
        raise ValueError(f"{path}: model_type {kind!r} is not supported; mujina imports llama and mixtral")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {c['hidden_act']!r} unsupported (SwiGLU needs silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError(f"{path}: attention/MLP biases are not supported by mujina's Llama")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{path}: rope scaling {rope.get('rope_type')!r} is not supported (default only)")
    theta = c.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        theta = 10000.0 if kind == "llama" else 1e6  # transformers' defaults for each architecture
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // heads
    if hd * heads != c["hidden_size"]:
        raise ValueError(f"{path}: head_dim {hd} x heads {heads} != hidden_size; not supported")
    if kind == "mixtral" and c.get("sliding_window"):
        raise ValueError(f"{path}: sliding-window attention is not supported")
    moe = None
    if kind == "mixtral":
        moe = MoEConfig(num_experts=c["num_local_experts"], top_k=c["num_experts_per_tok"],
                        aux_loss_coef=c.get("router_aux_loss_coef", 0.02))
    return ModelConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        max_seq_len=c.get("max_position_embeddings", 2048), rope_theta=float(theta),
        rms_norm_eps=c.get("rms_norm_eps", 1e-5), tie_word_embeddings=c.get("tie_word_embeddings", False),
        init_std=c.get("initializer_range", 0.02), moe=moe,
    )


def _read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out: dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).exists():
            raise FileNotFoundError(f"{hf_dir / name} is missing (only safetensors weights are read)")
        with safe_open(str(hf_dir / name), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                out[k] = f.get_tensor(k)
    return out


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a Llama or Mixtral directory to a mujina checkpoint; returns the checkpoint dir."""
    from .checkpoint import save_checkpoint  # local: checkpoint imports transformer, keep hf light
    from .transformer import Transformer

    hf_dir = Path(hf_dir)
    cfg = _read_hf_config(hf_dir)
    hf = _read_hf_tensors(hf_dir)
    inv_top = {v: k for k, v in _TOP.items()}
    inv_layer = {v: k for k, v in {**_LAYER, **_DENSE_FFN}.items()}
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in hf.items():
        if name in inv_top:
            state[inv_top[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"{hf_dir}: unexpected tensor {name!r}")
        i, rest = int(m.group(1)), m.group(2)
        p = f"layers.{i}."
        if rest in inv_layer:
            state[p + inv_layer[rest]] = t
        elif rest in ("block_sparse_moe.gate.weight", "mlp.gate.weight"):
            state[p + "feed_forward.router.weight"] = t
        elif e := re.fullmatch(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", rest):
            experts.setdefault((i, e.group(2)), {})[int(e.group(1))] = t
        elif rest == "mlp.experts.gate_up_proj":  # fused layout, gate half first: [E, 2F, D]
            F_ = t.shape[1] // 2
            state[p + "feed_forward.w1_EFD"], state[p + "feed_forward.w3_EFD"] = t[:, :F_], t[:, F_:]
        elif rest == "mlp.experts.down_proj":  # [E, D, F]
            state[p + "feed_forward.w2_EDF"] = t
        elif rest.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        else:
            raise ValueError(f"{hf_dir}: unexpected tensor {name!r}")
    stacked = {"w1": "w1_EFD", "w3": "w3_EFD", "w2": "w2_EDF"}
    for (i, w), per_expert in experts.items():
        n = cfg.moe.num_experts if cfg.moe else 0
        if sorted(per_expert) != list(range(n)):
            raise ValueError(f"{hf_dir}: layer {i} {w}: experts {sorted(per_expert)} (expected 0..{n - 1})")
        state[f"layers.{i}.feed_forward.{stacked[w]}"] = torch.stack([per_expert[j] for j in range(n)])
    if cfg.tie_word_embeddings:
        state.pop("output.weight", None)
        state["output.weight"] = state["tok_embeddings.weight"]

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"{hf_dir}: tensors do not match its config.json (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight

    tok = [hf_dir / f for f in _TOKENIZER_FILES if (hf_dir / f).exists()]
    out = save_checkpoint(out_dir, model)
    if tok:
        (out / TOKENIZER).mkdir(exist_ok=True)
        for f in tok:
            shutil.copy2(f, out / TOKENIZER / f.name)
    return out


# ---- sampling with transformers -----------------------------------------------------------------

def sample(hf_dir: str | os.PathLike, prompt: str | list[int], *, max_new_tokens: int = 32,
           temperature: float = 0.0, seed: int = 0) -> tuple[list[int], str | None]:
    """Generate with transformers from an exported directory: (token ids, decoded text or None).

    `prompt` is text (needs tokenizer files in hf_dir) or a list of token ids. temperature 0 = greedy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = Path(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = None
    if any((hf_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        tok = AutoTokenizer.from_pretrained(hf_dir)
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError(f"{hf_dir} has no tokenizer files: pass the prompt as token ids instead")
        ids = tok(prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([prompt], dtype=torch.long)
    new = _generate(model, ids, max_new_tokens, temperature, seed)
    return new, (tok.decode(new) if tok is not None else None)


def _generate(model, ids: torch.Tensor, max_new_tokens: int, temperature: float, seed: int,
              stop: list[int] | None = None) -> list[int]:
    """The new token ids of one generation (greedy at temperature 0), stopping at `stop` ids if given."""
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    if stop:
        kw["eos_token_id"] = stop
    out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=model.config.eos_token_id or 0, **kw)
    return out[0, ids.shape[1]:].tolist()


def chat(hf_dir: str | os.PathLike, messages: list[dict], *, max_new_tokens: int = 64, temperature: float = 0.0,
         seed: int = 0) -> tuple[list[int], str]:
    """One assistant turn with transformers: the export's chat template (the project's chat format, written
    by `export`) renders `messages` with the generation prompt, and generation stops at `<|end|>`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = Path(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{hf_dir} has no chat template in tokenizer_config.json: export the checkpoint again "
                         "with `mujina-model export` (it writes the project's chat format)")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    end = tok.convert_tokens_to_ids("<|end|>")
    stop = [i for i in (end, model.config.eos_token_id) if isinstance(i, int) and i >= 0]
    new = _generate(model, ids, max_new_tokens, temperature, seed, stop)
    return new, tok.decode([i for i in new if i not in stop], skip_special_tokens=False)

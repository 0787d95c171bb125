"""`mujina-model`: inspect, create, upcycle and convert checkpoints.

    mujina-model info tanuki-8x8b --json
    mujina-model init --preset debug --seed 0 --out ckpt/dense
    mujina-model upcycle --checkpoint ckpt/dense --experts 8 --top-k 2 --out ckpt/moe
    mujina-model export --checkpoint ckpt/moe --out hf/moe        # -> MixtralForCausalLM
    mujina-model import --hf hf/moe --out ckpt/moe-again
    mujina-model convert --dcp runs/x/checkpoints/step_001000 --out ckpt/step1000   # torchrun -> safetensors
    mujina-model sample --hf hf/moe --prompt-ids 1,10,13,16
    mujina-model export --checkpoint runs/dpo/checkpoints/step_000100 --out hf/merged \
        --adapter-out hf/adapter --base-out hf/base        # a LoRA run: merged model, peft adapter, its base
    mujina-model merge --checkpoint runs/dpo/checkpoints/step_000100 --out ckpt/merged
    mujina-model chat --hf hf/merged --user "東京のおすすめは?"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .checkpoint import TOKENIZER, load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig
from .transformer import Transformer


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def cmd_info(a: argparse.Namespace) -> None:
    cfg = ModelConfig.load(a.spec)
    info = {"total_params": cfg.num_params(), "active_params": cfg.num_active_params(), "config": cfg.to_dict()}
    if a.json:
        print(json.dumps(info, indent=2))
        return
    kind = f"MoE {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}" if cfg.moe else "dense"
    print(f"{a.spec}: {kind}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, vocab {cfg.vocab_size}")
    print(f"  total parameters:  {info['total_params']:>16,}  ({_human(info['total_params'])})")
    print(f"  active parameters: {info['active_params']:>16,}  ({_human(info['active_params'])})")


def cmd_init(a: argparse.Namespace) -> None:
    cfg = ModelConfig.load(a.preset)
    if cfg.num_params() > 2e9 and not a.force:
        gib = cfg.num_params() * 4 / 2**30
        raise ValueError(f"{a.preset} has {_human(cfg.num_params())} parameters ({gib:.0f} GiB in fp32); "
                         "pass --force if you really want a random checkpoint that large")
    torch.manual_seed(a.seed)
    out = save_checkpoint(a.out, Transformer(cfg))
    print(f"initialised {a.preset} ({_human(cfg.num_params())} parameters, seed {a.seed}) in {out}")


def cmd_upcycle(a: argparse.Namespace) -> None:
    from .upcycle import upcycle

    dense = load_checkpoint(a.checkpoint)
    moe = upcycle(dense, a.experts, a.top_k, noise_std=a.noise_std, drop_ratio=a.drop_ratio, seed=a.seed)
    tok = Path(a.checkpoint) / TOKENIZER
    out = save_checkpoint(a.out, moe, tokenizer_dir=tok if tok.is_dir() else None)
    exact = a.noise_std == 0 and a.drop_ratio == 0
    print(f"upcycled {a.checkpoint} into {a.experts} experts (top-{a.top_k}): "
          f"{_human(moe.cfg.num_params())} total, {_human(moe.cfg.num_active_params())} active -> {out}"
          + ("; logits equal the dense model's" if exact else ""))


def cmd_export(a: argparse.Namespace) -> None:
    import tempfile

    from .finetune import read_lora_spec
    from .hf import export_hf

    lora = read_lora_spec(a.checkpoint) is not None
    if (a.adapter_out or a.base_out) and not lora:
        raise ValueError(f"--adapter-out and --base-out export a LoRA run's checkpoint; {a.checkpoint} has no "
                         "lora.json (give OUT/checkpoints/step_N of a finetune.mode lora run)")
    if lora:  # the merged model to --out; the base and the peft adapter on request
        from .peft_io import base_of_lora_checkpoint, merge_lora_checkpoint, write_peft_adapter

        with tempfile.TemporaryDirectory(dir=Path(a.out).resolve().parent) as tmp:
            if a.base_out:
                export_hf(base_of_lora_checkpoint(a.checkpoint, Path(tmp) / "base"), a.base_out, dtype=a.dtype,
                          max_shard_size=a.max_shard_size)
                print(f"exported the base of {a.checkpoint} to {a.base_out}")
            if a.adapter_out:
                base = str(Path(a.base_out).resolve()) if a.base_out else "the base exported with --base-out"
                write_peft_adapter(a.checkpoint, a.adapter_out, base_name=base)
                print(f"wrote the peft adapter to {a.adapter_out} (PeftModel.from_pretrained(base, "
                      f"{a.adapter_out}); base: {base})")
            merged = merge_lora_checkpoint(a.checkpoint, Path(tmp) / "merged")
            out = export_hf(merged, a.out, dtype=a.dtype, max_shard_size=a.max_shard_size)
    else:
        out = export_hf(a.checkpoint, a.out, dtype=a.dtype, max_shard_size=a.max_shard_size)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    conf = out / "tokenizer_config.json"
    if conf.exists() and json.loads(conf.read_text()).get("chat_template"):
        tok = "with its tokenizer and a chat template (it can serve as a synthetic-data teacher)"
    elif any((out / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        tok = "with its tokenizer (no tokenizer_config.json: no chat template)"
    else:
        tok = (f"without tokenizer files ({a.checkpoint}/{TOKENIZER}/ has none): `sample` needs --prompt-ids, and a "
               "teacher needs a tokenizer")
    print(f"exported {a.checkpoint}{' (LoRA, merged)' if lora else ''} as {arch} to {out}, {tok}")


def cmd_merge(a: argparse.Namespace) -> None:
    from .peft_io import merge_lora_checkpoint

    out = merge_lora_checkpoint(a.checkpoint, a.out)
    print(f"merged the adapters of {a.checkpoint} into {out} (W + (alpha/r) B A): a plain checkpoint")


def cmd_chat(a: argparse.Namespace) -> None:
    from .hf import chat

    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.user}]
    ids, reply = chat(a.hf, messages, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    print(json.dumps({"messages": messages, "reply": reply, "generated_ids": ids}, ensure_ascii=False))


def cmd_import(a: argparse.Namespace) -> None:
    from .hf import import_hf

    out = import_hf(a.hf, a.out)
    print(f"imported {a.hf} into {out}")


def cmd_convert(a: argparse.Namespace) -> None:
    from .checkpoint import convert_distributed

    out = convert_distributed(a.dcp, a.out)
    print(f"converted {a.dcp} into {out}")


def cmd_sample(a: argparse.Namespace) -> None:
    from .hf import sample

    if (a.prompt is None) == (a.prompt_ids is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    prompt = a.prompt if a.prompt is not None else [int(x) for x in a.prompt_ids.split(",")]
    ids, text = sample(a.hf, prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    print(json.dumps({"prompt": prompt, "generated_ids": ids, "text": text}, ensure_ascii=False))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mujina-model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts of a preset, config file or checkpoint (no weights allocated)")
    s.add_argument("spec", help=f"a preset ({', '.join(PRESETS)}), a config file (YAML/JSON) or a checkpoint dir")
    s.add_argument("--json", action="store_true", help="print JSON with total_params and active_params")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("init", help="write a randomly initialised checkpoint")
    s.add_argument("--preset", required=True, help="preset name or config file")
    s.add_argument("--seed", type=int, default=0, help="random seed [0]")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--force", action="store_true", help="allow models above 2B parameters")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("upcycle", help="turn a dense checkpoint into a Mixture-of-Experts")
    s.add_argument("--checkpoint", required=True, help="dense checkpoint directory")
    s.add_argument("--experts", type=int, required=True, help="experts per layer, e.g. 8")
    s.add_argument("--top-k", type=int, required=True, help="experts per token, e.g. 2")
    s.add_argument("--noise-std", type=float, default=0.0,
                   help="std of Gaussian noise added to expert weights [0: exact upcycling]")
    s.add_argument("--drop-ratio", type=float, default=0.0,
                   help="share of each expert's FFN neurons re-initialised (Drop-Upcycling) [0]")
    s.add_argument("--seed", type=int, default=0, help="seed for router init, noise and drop [0]")
    s.add_argument("--out", required=True, help="MoE checkpoint directory to write")
    s.set_defaults(fn=cmd_upcycle)

    s = sub.add_parser("export", help="write a Hugging Face LlamaForCausalLM / MixtralForCausalLM directory")
    s.add_argument("--checkpoint", required=True, help="mujina checkpoint directory")
    s.add_argument("--out", required=True, help="Hugging Face directory to write")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights [as stored]")
    s.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size [5GB]")
    s.add_argument("--adapter-out", help="LoRA checkpoint only: also write a peft adapter directory "
                   "(adapter_config.json + adapter_model.safetensors) for the base (--base-out)")
    s.add_argument("--base-out", help="LoRA checkpoint only: also export the frozen base the adapter applies to")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("merge", help="fold a LoRA run's adapters into its base: a plain checkpoint")
    s.add_argument("--checkpoint", required=True, help="a LoRA run's checkpoint (OUT/checkpoints/step_N, lora.json)")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("import", help="convert a Hugging Face Llama or Mixtral directory to a checkpoint")
    s.add_argument("--hf", required=True, help="Hugging Face model directory (safetensors weights)")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("convert", help="turn a distributed (torchrun) checkpoint into a safetensors checkpoint")
    s.add_argument("--dcp", required=True, help="a checkpoint directory written under torchrun "
                   "(OUT/checkpoints/step_N, with a .metadata file)")
    s.add_argument("--out", required=True, help="checkpoint directory to write (for upcycle, export, init_from)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("sample", help="generate with transformers from an exported directory")
    s.add_argument("--hf", required=True, help="Hugging Face directory written by `export`")
    s.add_argument("--prompt", help="prompt text (needs tokenizer files)")
    s.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,10,13,16")
    s.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate [16]")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    s.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("chat", help="one assistant turn with transformers, through the export's chat template")
    s.add_argument("--hf", required=True, help="Hugging Face directory written by `export` (with its chat template)")
    s.add_argument("--user", required=True, help="the user's message")
    s.add_argument("--system", help="an optional system prompt")
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most [64]; <|end|> stops")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    s.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    s.set_defaults(fn=cmd_chat)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mujina-model {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

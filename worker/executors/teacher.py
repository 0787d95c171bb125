"""Teacher models for `generate` and `judge`: a local Hugging Face directory behind one `Engine` interface.

    engine = load_engine(ctx, payload["teacher"], payload["sampling"])   # cached across tasks
    outs = engine.generate([messages, ...], sampling, seed)    # [(text, prompt_tokens, output_tokens)]

Engines, chosen once per (directory, device, quantisation):
  * `vllm` when vLLM is installed and the device is CUDA (and no bitsandbytes quantisation is asked);
  * `transformers` otherwise: AutoModelForCausalLM + the tokenizer's chat template, batched sampling
    with left padding; on CUDA optionally 4-bit/8-bit through bitsandbytes (`quantize` 4bit/8bit, or
    auto: only when the model's files are larger than the task's memory budget).
Both are imported lazily, so a worker that never generates never imports them. The teacher's
identity is `model_files_hash` of its directory (cached per file sizes and times), which the
coordinator compares with the task's.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from . import TaskContext, TaskError, WorkerFault, allowed_local_path

log = logging.getLogger(__name__)

_ENGINES: dict[tuple, Engine] = {}
_HASHES: dict[tuple, str] = {}


def teacher_dir(ctx: TaskContext, ref: dict) -> Path:
    """Where this worker keeps the teacher `ref["name"]`: its --teacher mapping; else the task's `path`, only if it
    lies under the volunteer's --allow-local-paths. A teacher this worker does not have is a WorkerFault (the
    machine, not the task: every task of the kind would fail the same way)."""
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
        raise TaskError("payload.teacher must be {name, sha256[, path]}")
    name = ref["name"]
    if name in ctx.teachers:
        path = Path(ctx.teachers[name])
        if not path.is_dir():
            raise WorkerFault(f"teacher {name!r}: directory {path} (--teacher {name}={path}) does not exist; "
                              "fix the path")
        return path
    if ref.get("path"):
        try:
            path = allowed_local_path(ctx, str(ref["path"]), f"the task's teacher {name!r}")
        except TaskError as e:  # the path is not read; without it this worker has no such teacher
            raise WorkerFault(f"this worker has no teacher {name!r}: download it and pass --teacher {name}=DIR "
                              f"({e})") from None
        if not path.is_dir():
            raise WorkerFault(f"teacher {name!r}: the task's directory {path} does not exist on this worker; "
                              f"download it and pass --teacher {name}=DIR")
        return path
    raise WorkerFault(f"this worker has no teacher {name!r}: download it and pass --teacher {name}=DIR "
                      "(or [teachers] in worker.toml)")


def check_teacher(path: Path) -> str:
    """'' when `path` holds a teacher this worker can load (config.json, a tokenizer with a chat template), else
    why not, in words (for `doctor` and before a task loads the model)."""
    from transformers import AutoConfig, AutoTokenizer

    if not path.is_dir():
        return f"directory {path} does not exist"
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        return f"{path}/config.json cannot be read ({str(e).splitlines()[0][:200]})"
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        return f"the tokenizer in {path} cannot be loaded ({str(e).splitlines()[0][:200]})"
    if not getattr(tok, "chat_template", None):
        return f"no chat template in {path}/tokenizer_config.json (its \"chat_template\" key)"
    return ""


def files_hash(path: Path) -> str:
    from data_shards.synthetic import model_files_hash

    key = (str(path.resolve()), tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                             for p in path.rglob("*") if p.is_file())))
    if key not in _HASHES:
        _HASHES[key] = model_files_hash(path)
    return _HASHES[key]


class Engine:
    name = ""

    def generate(self, conversations: list[list[dict]], sampling: dict, seed: int,
                 should_stop=lambda: False) -> list[tuple[str, int, int]]:
        """[(text, prompt tokens, output tokens)] per conversation; `should_stop()` may end decoding early."""
        raise NotImplementedError


class HFEngine(Engine):
    name = "transformers"

    def __init__(self, path: Path, device: str, quantize: str, name: str = ""):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        if not self.tok.chat_template:
            raise WorkerFault(f"teacher {name or path.name!r} has no chat template in {path}/tokenizer_config.json")
        self.tok.padding_side = "left"  # generation continues each prompt from its last token
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        kw: dict = {}
        if quantize in ("4bit", "8bit"):
            if importlib.util.find_spec("bitsandbytes") is None:
                raise WorkerFault(f"quantize={quantize} needs bitsandbytes: pip install bitsandbytes (CUDA only)")
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=quantize == "4bit",
                                                           load_in_8bit=quantize == "8bit")
            kw["device_map"] = {"": device}
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()
        if not kw:
            self.model.to(device)
        self.device = device

    @torch.no_grad()
    def generate(self, conversations, sampling, seed, should_stop=lambda: False):
        texts = [self.tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        temperature = float(sampling.get("temperature", 0.0))
        kw = dict(do_sample=True, temperature=temperature, top_p=float(sampling.get("top_p", 1.0))) \
            if temperature > 0 else dict(do_sample=False)
        # checked after every decoding step, so SIGTERM or a cancelled lease stops within one token
        halt = lambda input_ids, scores, **_: torch.full((input_ids.shape[0],), should_stop(),  # noqa: E731
                                                         dtype=torch.bool, device=input_ids.device)
        out = self.model.generate(**enc, max_new_tokens=int(sampling["max_new_tokens"]),
                                  pad_token_id=self.tok.pad_token_id, stopping_criteria=[halt], **kw)
        new = out[:, enc["input_ids"].shape[1]:].tolist()  # (B, new) one host copy for the whole batch
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        stop = {self.tok.eos_token_id, self.tok.pad_token_id}
        results = []
        for ids, n_prompt in zip(new, prompt_lens, strict=True):
            end = next((i for i, t in enumerate(ids) if t in stop), len(ids))
            results.append((self.tok.decode(ids[:end], skip_special_tokens=True), int(n_prompt), end))
        return results


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, path: Path, device: str, max_memory_bytes: int):
        from vllm import LLM

        frac = 0.9
        if max_memory_bytes and torch.cuda.is_available():
            frac = min(0.9, max_memory_bytes / torch.cuda.get_device_properties(device).total_memory)
        self.llm = LLM(model=str(path), gpu_memory_utilization=frac)

    def generate(self, conversations, sampling, seed, should_stop=lambda: False):
        from vllm import SamplingParams

        params = SamplingParams(temperature=float(sampling.get("temperature", 0.0)),
                                top_p=float(sampling.get("top_p", 1.0)), max_tokens=int(sampling["max_new_tokens"]),
                                seed=seed)
        outs = self.llm.chat(conversations, params, use_tqdm=False)
        return [(o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids)) for o in outs]


def load_engine(ctx: TaskContext, ref: dict, sampling: dict) -> tuple[Engine, str]:
    """(engine, model files hash) for the task's teacher, loaded once per worker process."""
    path = teacher_dir(ctx, ref)
    quantize = sampling.get("quantize", "none")
    if quantize not in ("none", "4bit", "8bit", "auto"):
        raise TaskError(f"sampling.quantize must be none, 4bit, 8bit or auto, got {quantize!r}")
    cuda = ctx.device.startswith("cuda")
    if quantize in ("4bit", "8bit") and not cuda:
        raise TaskError(f"quantize={quantize} (bitsandbytes) needs a CUDA device; this worker runs on {ctx.device}")
    if quantize == "auto":
        size = sum(p.stat().st_size for p in path.glob("*.safetensors")) or sum(
            p.stat().st_size for p in path.glob("*.bin"))
        quantize = "4bit" if cuda and ctx.max_memory_bytes and size > ctx.max_memory_bytes else "none"
    digest = files_hash(path)
    if ref.get("sha256") and digest != ref["sha256"]:  # the coordinator would refuse every record of it
        raise WorkerFault(f"teacher {ref['name']!r} in {path} is not the project's: its files hash to {digest[:12]}, "
                          f"the task wants {ref['sha256'][:12]}; point --teacher {ref['name']}=DIR at the same files")
    use_vllm = cuda and quantize == "none" and importlib.util.find_spec("vllm") is not None
    key = (str(path), digest, ctx.device, quantize, use_vllm)
    if key not in _ENGINES:
        log.info("loading teacher %s from %s on %s (%s%s)", ref["name"], path, ctx.device,
                 "vllm" if use_vllm else "transformers", "" if quantize == "none" else f", {quantize}")
        _ENGINES.clear()  # one teacher in memory at a time
        _ENGINES[key] = VLLMEngine(path, ctx.device, ctx.max_memory_bytes) if use_vllm else \
            HFEngine(path, ctx.device, quantize, ref["name"])
    return _ENGINES[key], digest


RETRY_SEED_STRIDE = 1_000_003   # attempt k samples from seed + stride·(k - 1): beyond any batch offset


def batched_generate(ctx: TaskContext, engine: Engine, conversations: list[list[dict]], sampling: dict,
                     batch_size: int) -> list[tuple[str, int, int]]:
    """Generate in batches of `batch_size`, seed per batch, checking for stop and reporting progress between.
    A retried task (attempt 2, 3, ...) samples with another seed: a sample the coordinator refused is not
    drawn again."""
    out: list[tuple[str, int, int]] = []
    seed = int(sampling.get("seed", 0)) + RETRY_SEED_STRIDE * (max(ctx.attempt, 1) - 1)
    for b, i in enumerate(range(0, len(conversations), batch_size)):
        ctx.check_stop()
        out += engine.generate(conversations[i: i + batch_size], sampling, seed + b, ctx.stop_requested)
        ctx.check_stop()  # a batch cut short by a stop request is not a result
        ctx.report_progress(len(out) / len(conversations))
    return out

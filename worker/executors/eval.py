"""`eval`: the loss of a checkpoint on a token shard, both fetched through the worker's cache.

payload: {"checkpoint": NAME, "shard": NAME, "shard_tokens": N [, "seq_len": L, "batch_size": B]}
  checkpoint  a directory under the coordinator's checkpoints/ holding config.json + model.safetensors
              (both fetched through the cache, which re-fetches them when the coordinator rewrote them)
  shard       a shard file under shards/ (data_shards format)
Result metrics: {"loss": mean next-token cross-entropy (nats), "tokens": predicted tokens, "gpu_seconds"}.

Documents are evaluated one sequence window at a time (no packing across documents), so the loss is
exactly the mean over every predicted token of the shard, independent of batch size.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from . import Result, TaskContext, TaskError


def _link(src, dst) -> None:
    """Put a cached object at the name the checkpoint loader expects (hard link; copy across devices)."""
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def run_eval(ctx: TaskContext) -> Result:
    from data_shards.shards import ShardError, ShardReader
    from model.checkpoint import CONFIG, WEIGHTS, load_checkpoint

    p = ctx.payload
    for key in ("checkpoint", "shard"):
        if not isinstance(p.get(key), str) or not p[key]:
            raise TaskError(f"eval payload.{key} must be a non-empty name")
    if ctx.fetch is None:
        raise TaskError("eval needs a fetch function (the daemon's cache)")
    ckpt = ctx.work_dir / "checkpoint"
    ckpt.mkdir()
    try:
        _link(ctx.fetch("checkpoint", f"{p['checkpoint']}/{CONFIG}"), ckpt / CONFIG)
        try:
            _link(ctx.fetch("checkpoint", f"{p['checkpoint']}/{WEIGHTS}"), ckpt / WEIGHTS)
        except FileNotFoundError:
            raise TaskError(f"eval: checkpoint {p['checkpoint']!r} on the coordinator has {CONFIG} but no {WEIGHTS}; "
                            "a checkpoint written under torchrun must be converted first (mujina-model convert "
                            "--dcp DIR --out DIR)") from None
        net = load_checkpoint(ckpt, device=ctx.device).eval()
        reader = ShardReader(ctx.fetch("shard", p["shard"]))
    except (ValueError, ShardError, FileNotFoundError) as err:
        raise TaskError(f"eval: {err}") from None
    seq_len = int(p.get("seq_len", net.cfg.max_seq_len))
    if not 2 <= seq_len <= net.cfg.max_seq_len:
        raise TaskError(f"eval payload.seq_len must be in [2, {net.cfg.max_seq_len}], got {seq_len}")
    if int(reader.tokens.max(initial=0)) >= net.cfg.vocab_size:
        raise TaskError(f"shard {p['shard']} has token ids >= the checkpoint's vocabulary ({net.cfg.vocab_size}): "
                        "it was made with another tokenizer")
    t0 = time.perf_counter()
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for d in range(reader.num_documents):
            ctx.check_stop()
            doc = torch.from_numpy(reader.document(d).astype("int64"))
            # windows overlap by one token so that every token after the first is predicted exactly once
            for start in range(0, max(len(doc) - 1, 0), seq_len - 1):
                ids = doc[start: start + seq_len].to(ctx.device)[None]  # (1, T)
                if ids.shape[1] < 2:
                    break
                logits = net(ids)  # (1, T, V)
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                total_loss += float(loss)
                total_tokens += ids.shape[1] - 1
            ctx.report_progress((d + 1) / reader.num_documents)
    if total_tokens == 0:
        raise TaskError(f"shard {p['shard']} has no document of two or more tokens: nothing to evaluate")
    metrics = {"loss": total_loss / total_tokens, "tokens": float(total_tokens)}
    if ctx.device.startswith("cuda"):
        metrics["gpu_seconds"] = time.perf_counter() - t0
    return Result(metrics=metrics, metadata={"device": ctx.device})

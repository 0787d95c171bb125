"""`generate`: answers of a teacher model to the task's prompts (planned by coordinator/plan.py).

payload: {"teacher": {name, sha256[, path]}, "answer": 0|1, "prompts": [{id, lang, template, messages}],
          "sampling": {temperature, top_p, max_new_tokens, seed, quantize}, "limits": {...}, "batch_size": N}
Result: JSON lines, one per prompt, in the task's order:
    {"prompt_id", "answer", "output", "prompt_tokens", "output_tokens", "engine", "model_sha256"}
metrics: {"records", "output_tokens"}. The coordinator checks the records (coordinator/validate_synthetic.py).
"""

from __future__ import annotations

import json

from . import Result, TaskContext, TaskError
from .teacher import batched_generate, load_engine


def run_generate(ctx: TaskContext) -> Result:
    p = ctx.payload
    prompts, sampling = p.get("prompts"), p.get("sampling")
    if not isinstance(prompts, list) or not prompts or not isinstance(sampling, dict) \
            or not isinstance(sampling.get("max_new_tokens"), int):
        raise TaskError("generate payload needs prompts (a non-empty list) and sampling.max_new_tokens")
    if not all(isinstance(q, dict) and isinstance(q.get("id"), str) and isinstance(q.get("messages"), list)
               for q in prompts):
        raise TaskError("generate payload.prompts must be {id, messages} objects")
    engine, digest = load_engine(ctx, p.get("teacher"), sampling)
    outs = batched_generate(ctx, engine, [q["messages"] for q in prompts], sampling, int(p.get("batch_size", 8)))
    lines = [json.dumps({"prompt_id": q["id"], "answer": int(p.get("answer", 0)), "output": text,
                         "prompt_tokens": n_in, "output_tokens": n_out, "engine": engine.name,
                         "model_sha256": digest}, ensure_ascii=False)
             for q, (text, n_in, n_out) in zip(prompts, outs, strict=True)]
    return Result(data=("\n".join(lines) + "\n").encode(),
                  metrics={"records": float(len(lines)), "output_tokens": float(sum(o[2] for o in outs))},
                  metadata={"engine": engine.name, "device": ctx.device})

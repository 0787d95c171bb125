"""`judge`: a teacher scores two answers to the same prompt with a rubric (LLM-as-a-judge).

payload: {"teacher": {...}, "pairs": [{prompt_id, lang, messages, answers: [a, b]}], "sampling": {...},
          "batch_size": N}
Result: JSON lines, one per pair: {"prompt_id", "judgement" (the raw output), "scores": [a, b] or null,
"verdict": "ok" | "unparseable", "output_tokens", "engine", "model_sha256"}. The strict format is parsed
by data_shards.synthetic.parse_judgement; what does not follow it is marked unparseable, never guessed
(the coordinator parses the raw judgement again itself).
"""

from __future__ import annotations

import json

from data_shards.synthetic import judge_messages, parse_judgement

from . import Result, TaskContext, TaskError
from .teacher import batched_generate, load_engine


def run_judge(ctx: TaskContext) -> Result:
    p = ctx.payload
    pairs, sampling = p.get("pairs"), p.get("sampling")
    if not isinstance(pairs, list) or not pairs or not isinstance(sampling, dict) \
            or not isinstance(sampling.get("max_new_tokens"), int):
        raise TaskError("judge payload needs pairs (a non-empty list) and sampling.max_new_tokens")
    try:
        conversations = [judge_messages(q["messages"], q["answers"][0], q["answers"][1], q.get("lang", "en"))
                         for q in pairs]
    except (KeyError, IndexError, TypeError) as err:
        raise TaskError(f"judge payload.pairs must be {{prompt_id, lang, messages, answers: [a, b]}} ({err})") \
            from None
    engine, digest = load_engine(ctx, p.get("teacher"), sampling)
    outs = batched_generate(ctx, engine, conversations, sampling, int(p.get("batch_size", 8)))
    lines = []
    for q, (text, _, n_out) in zip(pairs, outs, strict=True):
        scores = parse_judgement(text)
        lines.append(json.dumps({"prompt_id": q["prompt_id"], "judgement": text,
                                 "scores": list(scores) if scores else None,
                                 "verdict": "ok" if scores else "unparseable", "output_tokens": n_out,
                                 "engine": engine.name, "model_sha256": digest}, ensure_ascii=False))
    return Result(data=("\n".join(lines) + "\n").encode(),
                  metrics={"records": float(len(lines)), "output_tokens": float(sum(o[2] for o in outs))},
                  metadata={"engine": engine.name, "device": ctx.device})

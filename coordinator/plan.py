"""`mujina-coordinator plan`: the project's synthetic section -> generate tasks, then judge tasks, then shards.

Every run is idempotent, so the organizer runs it whenever they like (e.g. from cron):
  0. pending generate (judge) tasks planned with another hash of the teacher (judge) than its files have
     now (its directory changed: new weights, a new chat template) are retired (cancelled, so they go dead
     with `CANCELLED: ...` as their last error): no worker with the current files could run them, and
     step 1 plans their prompts again under the new hash;
  1. prompts (data_shards.synthetic.build_prompts) are cut into batches of `batch_size`; each batch
     becomes two generate tasks (answer 0 and answer 1, with different seeds), whose ids are hashes
     of the run, the batch's prompt ids and the answer index: a task that exists is not added again;
  2. prompts whose two answers were both accepted (STATE_DIR/synthetic/generated.jsonl) and that no
     judge task covers yet are batched into judge tasks (ids: hashes of their prompt ids);
  3. with `synthetic.tokenizer` set, accepted records are sharded into STATE_DIR/synthetic/shards
     (data_shards.build, resumable: shards already written are kept), a source the loader reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from data_shards.synthetic import build_prompts, load_personas, model_files_hash

from . import store as S
from .config import ProjectConfig, TeacherConfig
from .scheduler import Scheduler

log = logging.getLogger(__name__)

RetireFn = Callable[[str, str, str, int], None]   # (kind, teacher name, old hash, tasks retired)


def _task_id(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def _seed(*parts: object) -> int:
    return int(_task_id(*parts)[:8], 16) & 0x7FFFFFFF


def teacher_ref(t: TeacherConfig) -> dict:
    if t.sha256 is None and (t.path is None or not t.path.is_dir()):
        raise ValueError(f"teacher {t.name}: path {t.path} is not a directory; fix its path or set sha256")
    ref = {"name": t.name, "sha256": t.sha256 or model_files_hash(t.path)}
    if t.path is not None:
        ref["path"] = str(t.path)
    return ref


def load_seeds(paths: list[Path], languages: list[str]) -> list[tuple[str, str]]:
    """(language, text) of each seed document: JSONL/text files via data_shards.ingest, or shard
    directories decoded with the tokenizer they carry."""
    from data_shards.filters import detect_language, normalize
    from data_shards.ingest import DropCounter, read_documents

    texts: list[str] = []
    for p in paths:
        if p.is_dir():
            from data_shards.shards import Manifest, ShardReader
            from data_shards.tokenizer import Tokenizer

            tok = Tokenizer(p / "tokenizer")
            for s in Manifest.load(p).shards:
                r = ShardReader(p / s.file)
                texts += [tok.decode([int(t) for t in r.document(i) if t not in (tok.bos_id, tok.eos_id)])
                          for i in range(r.num_documents)]
        elif p.exists():
            texts += [d.text for d in read_documents([p], drops=DropCounter()) if d.text]
        else:
            raise ValueError(f"synthetic.seeds: {p} does not exist")
    out = []
    for t in texts:
        lang = detect_language(normalize(t))
        if lang in languages:
            out.append((lang, t))
    if not out:
        raise ValueError(f"synthetic.seeds: no seed document in {', '.join(languages)}")
    return out


def plan(cfg: ProjectConfig, scheduler: Scheduler, on_retire: RetireFn | None = None) -> dict:
    """Add what is missing; returns counts {"generate": added, "judge": added, "prompts", "shards"}.
    Pending tasks of a teacher whose files changed are retired first (logged; `on_retire(kind, teacher name,
    old hash, n)` is called per kind and teacher, e.g. to tell the organizer)."""
    syn = cfg.synthetic
    if syn is None:
        raise ValueError("the project file has no `synthetic` section: nothing to plan (see configs/project.yaml)")
    personas = [p for path in syn.personas for p in load_personas(path)]
    seeds = load_seeds(syn.seeds, list(syn.languages))
    prompts = build_prompts(personas, seeds, list(syn.templates), syn.max_prompts, seed=syn.sampling.seed,
                            max_seed_chars=syn.max_seed_chars, languages=tuple(syn.languages))
    teacher = teacher_ref(syn.teacher)
    judge = teacher_ref(syn.judge) if syn.judge is not None else teacher
    with scheduler.store.read() as conn:
        rows = conn.execute(select(S.tasks.c.id, S.tasks.c.kind, S.tasks.c.state, S.tasks.c.payload)
                            .where(S.tasks.c.kind.in_(("generate", "judge")), S.tasks.c.run == cfg.run)).all()
    retired = retire_stale(scheduler, rows, {"generate": teacher, "judge": judge})
    for kind, name, old, n in retired["counts"]:
        if on_retire is not None:
            on_retire(kind, name, old, n)
    rows = [r for r in rows if r.id not in retired["ids"]]
    existing = {r.id for r in rows}
    judged = {p["prompt_id"] for r in rows if r.kind == "judge" for p in json.loads(r.payload)["pairs"]}
    sampling = syn.sampling.model_dump()
    limits = {"min_chars": syn.min_output_chars, "max_chars": syn.max_output_chars}
    added = {"generate": 0, "judge": 0, "prompts": len(prompts), "shards": 0}
    for i in range(0, len(prompts), syn.batch_size):
        batch = prompts[i: i + syn.batch_size]
        for answer in (0, 1):
            tid = _task_id(cfg.run, "generate", teacher["sha256"], answer, *(p.id for p in batch))
            if tid in existing:
                continue
            payload = {"teacher": teacher, "answer": answer, "prompts": [p.to_dict() for p in batch],
                       "sampling": {**sampling, "seed": _seed(syn.sampling.seed, tid)}, "limits": limits,
                       "batch_size": syn.batch_size}
            scheduler.add_task("generate", payload, priority=syn.priority, task_id=tid)
            added["generate"] += 1
    pairs = ready_pairs(Path(cfg.state_dir) / "synthetic" / "generated.jsonl", judged)
    for i in range(0, len(pairs), syn.judge_batch_size):
        batch = pairs[i: i + syn.judge_batch_size]
        tid = _task_id(cfg.run, "judge", judge["sha256"], *(p["prompt_id"] for p in batch))
        if tid in existing:
            continue
        payload = {"teacher": judge, "pairs": batch, "batch_size": syn.judge_batch_size,
                   "sampling": {**sampling, "temperature": 0.0, "seed": _seed(syn.sampling.seed, tid)}}
        scheduler.add_task("judge", payload, priority=syn.priority + 1, task_id=tid)
        added["judge"] += 1
    if syn.tokenizer is not None:
        added["shards"] = shard_accepted(cfg)
    log.info("plan: %d prompts; added %d generate and %d judge tasks; %d synthetic shards", len(prompts),
             added["generate"], added["judge"], added["shards"])
    return added


def retire_stale(scheduler: Scheduler, rows, current: dict[str, dict]) -> dict:
    """Cancel the pending tasks of `rows` (generate, judge) whose teacher hash is not `current[kind]`'s: they were
    planned before the teacher's files changed. Returns {"ids": set, "counts": [(kind, teacher, old hash, n)]}."""
    stale: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r.state != "pending":
            continue  # a leased task finishes or fails on its own; a done one keeps its result
        t = json.loads(r.payload).get("teacher", {})
        if t.get("sha256") != current[r.kind]["sha256"]:
            stale.setdefault((r.kind, t.get("name", "?"), t.get("sha256") or "?"), []).append(r.id)
    counts = []
    for (kind, name, old), ids in sorted(stale.items()):
        new = current[kind]
        n = scheduler.cancel_tasks(ids, f"retired by `plan`: teacher {name}'s files changed (hash {old[:12]} -> "
                                        f"{new['sha256'][:12]}); replanned under the new hash")
        counts.append((kind, name, old, n))
        log.warning("plan: retired %d pending %s tasks planned with teacher %s's old hash %s (now %s)", n, kind,
                    name, old[:12], new["sha256"][:12])
    return {"ids": {i for ids in stale.values() for i in ids}, "counts": counts}


def ready_pairs(generated: Path, judged: set[str]) -> list[dict]:
    """Prompts with both answers accepted and no judge task yet, as judge pairs, sorted by prompt id."""
    if not generated.exists():
        return []
    answers: dict[str, dict] = {}
    for line in generated.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        answers.setdefault(r["prompt_id"], {})[r["answer"]] = r
    pairs = []
    for pid in sorted(answers):
        a = answers[pid]
        if pid in judged or 0 not in a or 1 not in a:
            continue
        prompt = a[0]["messages"][:-1]
        pairs.append({"prompt_id": pid, "lang": a[0]["lang"], "messages": prompt,
                      "answers": [a[0]["messages"][-1]["content"], a[1]["messages"][-1]["content"]]})
    return pairs


def shard_accepted(cfg: ProjectConfig) -> int:
    """Shard generated.jsonl (chat records, loss on the answers) into STATE_DIR/synthetic/shards."""
    from data_shards.build import ShardConfig, build_shards

    src = Path(cfg.state_dir) / "synthetic" / "generated.jsonl"
    if not src.exists():
        return 0
    manifest = build_shards([src], cfg.synthetic.tokenizer, Path(cfg.state_dir) / "synthetic" / "shards",
                            ShardConfig(source="synthetic", workers=1, dedup=False, shard_tokens=1 << 20))
    return len(manifest.shards)

"""Validators of `generate` and `judge` results, and the synthetic source they feed.

A generate upload is JSON lines, one record per prompt of the task:
    {"prompt_id", "answer", "output", "prompt_tokens", "output_tokens", "engine", "model_sha256"}
Refused whole (INVALID_ARGUMENT, no credit, nothing stored): bytes that are not UTF-8 JSON lines, a
record missing a field, prompt ids that are not exactly the task's, a model hash other than the
task's teacher, or no record surviving the per-record checks. Per record: non-empty, length bounds,
the template's language, data_shards' quality filters (repetition, symbols), output_tokens within
max_new_tokens, and exact + near-duplicate checks against everything accepted so far (and within
the upload). Accepted records are appended as chat records to STATE_DIR/synthetic/generated.jsonl
(which `plan` shards and pairs for judging); credit = accepted output tokens (`tokens_generated`).

A judge upload has one record per pair: {"prompt_id", "judgement", "output_tokens", "engine",
"model_sha256"}. The coordinator parses each judgement itself (data_shards.synthetic.parse_judgement):
unparseable ones are counted, never guessed; ties are dropped; the rest become DPO records in
STATE_DIR/synthetic/dpo.jsonl. Credit: the judge's output tokens.

Rejections are counted by kind and reason in STATE_DIR/synthetic/stats.json (read by `status` and
the metrics endpoint). The duplicate index survives restarts: the fingerprint of every accepted
record is appended to fingerprints.bin and replayed at start-up.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np

from data_shards.dedup import Deduplicator
from data_shards.synthetic import check_output, dpo_record, parse_judgement

from .validate import Credit, ValidationError, Validator

GENERATE_FIELDS = {"prompt_id": str, "answer": int, "output": str, "prompt_tokens": int, "output_tokens": int,
                   "engine": str, "model_sha256": str}
JUDGE_FIELDS = {"prompt_id": str, "judgement": str, "output_tokens": int, "engine": str, "model_sha256": str}
_STATES: dict[str, SyntheticState] = {}
_STATES_LOCK = threading.Lock()


class SyntheticState:
    """One project's synthetic source: accepted records, DPO records, duplicate index and counters."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.generated, self.dpo = root / "generated.jsonl", root / "dpo.jsonl"
        self.fingerprints, self.stats_path = root / "fingerprints.bin", root / "stats.json"
        self.lock = threading.Lock()
        self.dedup = Deduplicator()
        self._rec = np.dtype([("key", "<u8"), ("sig", "<u4", (self.dedup.num_perm,))])
        if self.fingerprints.exists():
            raw = self.fingerprints.read_bytes()
            recs = np.frombuffer(raw[: len(raw) - len(raw) % self._rec.itemsize], dtype=self._rec)
            for r in recs:
                self.dedup.check_fingerprint(int(r["key"]), r["sig"].copy())
        try:
            self.stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            self.stats = {}

    def count(self, kind: str, accepted: int = 0, tokens: int = 0, rejected: Counter | None = None) -> None:
        s = self.stats.setdefault(kind, {"accepted": 0, "tokens": 0, "rejected": {}})
        s["accepted"] += accepted
        s["tokens"] += tokens
        for reason, n in (rejected or {}).items():
            s["rejected"][reason] = s["rejected"].get(reason, 0) + n
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats, indent=1, sort_keys=True))
        tmp.replace(self.stats_path)

    def remember(self, fps: list[tuple[int, np.ndarray]]) -> None:
        recs = np.zeros(len(fps), dtype=self._rec)
        for i, (k, sig) in enumerate(fps):
            recs[i] = (k, sig)
        with open(self.fingerprints, "ab") as f:
            f.write(recs.tobytes())


def state_for(cfg) -> SyntheticState:
    root = Path(cfg.state_dir) / "synthetic"
    with _STATES_LOCK:
        key = str(root.resolve())
        if key not in _STATES:
            _STATES[key] = SyntheticState(root)
        return _STATES[key]


def forget_states() -> None:
    """Drop the in-memory states (a test simulating a coordinator restart reloads them from disk)."""
    with _STATES_LOCK:
        _STATES.clear()


def parse_records(data: bytes, fields: dict[str, type]) -> list[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("the upload is not UTF-8 JSON lines") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValidationError(f"upload line {n} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValidationError(f"upload line {n} is not a JSON object")
        for key, typ in fields.items():
            if not isinstance(rec.get(key), typ) or isinstance(rec.get(key), bool):
                raise ValidationError(f"upload line {n}: field {key!r} must be a {typ.__name__}")
        out.append(rec)
    if not out:
        raise ValidationError("the upload holds no records")
    return out


def _check_ids(records: list[dict], expected: list[str]) -> None:
    got = [r["prompt_id"] for r in records]
    if sorted(got) != sorted(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ValidationError(f"records must cover each of the task's {len(expected)} prompts once; missing "
                              f"{missing[:3]}, unexpected {extra[:3]}, {len(got)} records")


def _check_teacher(payload: dict, kind: str) -> None:
    t = payload.get("teacher")
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("sha256"), str):
        raise ValidationError(f"{kind} payload.teacher must be {{name, sha256[, path]}}")


class _Synthetic(Validator):
    state: SyntheticState | None = None

    def bind(self, cfg) -> Validator:
        bound = type(self)()
        bound.state = state_for(cfg)
        return bound

    def _refuse(self, kind: str, reasons: Counter, message: str):
        if self.state is not None:
            with self.state.lock:
                self.state.count(kind, rejected=reasons)
        raise ValidationError(message)

    def _model_hash(self, kind: str, payload: dict, records: list[dict]) -> None:
        want = payload["teacher"]["sha256"]
        bad = [r["model_sha256"] for r in records if r["model_sha256"] != want]
        if bad:
            self._refuse(kind, Counter({"model_hash": len(records)}),
                         f"model hash {bad[0][:12]}... does not match the task's teacher {payload['teacher']['name']} "
                         f"({want[:12]}...): the worker ran another model")


class GenerateValidator(_Synthetic):
    kind = "generate"

    def check_payload(self, payload: dict) -> None:
        _check_teacher(payload, "generate")
        prompts = payload.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(p, dict) and isinstance(p.get("id"), str) and p.get("lang") in ("ja", "en")
                and isinstance(p.get("messages"), list) for p in prompts):
            raise ValidationError("generate payload.prompts must be a non-empty list of {id, lang, messages}")
        if not isinstance(payload.get("sampling"), dict) or not isinstance(payload.get("limits"), dict):
            raise ValidationError("generate payload needs sampling and limits objects")

    def _verdicts(self, payload: dict, records: list[dict]) -> tuple[list, Counter]:
        """[(record, fingerprint)] of the records that pass, and the rejection reasons of the others."""
        prompts = {p["id"]: p for p in payload["prompts"]}
        limits, max_new = payload["limits"], payload["sampling"].get("max_new_tokens", 1 << 30)
        ok, reasons = [], Counter()
        local = Deduplicator()  # duplicates within this upload
        for r in records:
            reason = check_output(r["output"], prompts[r["prompt_id"]]["lang"], min_chars=limits["min_chars"],
                                  max_chars=limits["max_chars"])
            if reason is None and not 0 < r["output_tokens"] <= max_new:
                reason = "token_count"
            if reason is None and r["answer"] != payload.get("answer", r["answer"]):
                reason = "answer_index"
            fp = None
            if reason is None:
                fp = self.state.dedup.fingerprint(r["output"])
                reason = self.state.dedup.check_fingerprint(*fp, remember=False) or local.check_fingerprint(*fp)
            if reason is None:
                ok.append((r, fp))
            else:
                reasons[reason] += 1
        return ok, reasons

    def check_result(self, payload, metrics, elapsed_s, data=b""):
        records = parse_records(data, GENERATE_FIELDS)
        _check_ids(records, [p["id"] for p in payload["prompts"]])
        self._model_hash("generate", payload, records)
        with self.state.lock:
            ok, reasons = self._verdicts(payload, records)
        if not ok:
            self._refuse("generate", reasons, "no record passed the checks: " + ", ".join(
                f"{k} {v}" for k, v in sorted(reasons.items())))
        return [Credit("tasks", 1), Credit("tokens_generated", float(sum(r["output_tokens"] for r, _ in ok)))]

    def commit(self, task_id, payload, data):
        records = parse_records(data, GENERATE_FIELDS)
        prompts = {p["id"]: p for p in payload["prompts"]}
        with self.state.lock:
            ok, reasons = self._verdicts(payload, records)  # again: another result may have been accepted since
            for _, fp in ok:
                self.state.dedup.check_fingerprint(*fp)
            self.state.remember([fp for _, fp in ok])
            with open(self.state.generated, "a", encoding="utf-8") as f:
                for r, _ in ok:
                    p = prompts[r["prompt_id"]]
                    f.write(json.dumps({
                        "id": f"{r['prompt_id']}/{r['answer']}", "prompt_id": r["prompt_id"], "answer": r["answer"],
                        "lang": p["lang"], "template": p.get("template"), "task_id": task_id,
                        "teacher": payload["teacher"]["name"], "output_tokens": r["output_tokens"],
                        "messages": [*p["messages"], {"role": "assistant", "content": r["output"]}]},
                        ensure_ascii=False) + "\n")
            self.state.count("generate", accepted=len(ok), tokens=sum(r["output_tokens"] for r, _ in ok),
                             rejected=reasons)


class JudgeValidator(_Synthetic):
    kind = "judge"

    def check_payload(self, payload: dict) -> None:
        _check_teacher(payload, "judge")
        pairs = payload.get("pairs")
        if not isinstance(pairs, list) or not pairs or not all(
                isinstance(p, dict) and isinstance(p.get("prompt_id"), str) and isinstance(p.get("answers"), list)
                and len(p["answers"]) == 2 for p in pairs):
            raise ValidationError("judge payload.pairs must be a non-empty list of {prompt_id, messages, answers[2]}")

    def check_result(self, payload, metrics, elapsed_s, data=b""):
        records = parse_records(data, JUDGE_FIELDS)
        _check_ids(records, [p["prompt_id"] for p in payload["pairs"]])
        self._model_hash("judge", payload, records)
        max_new = payload.get("sampling", {}).get("max_new_tokens", 1 << 30)
        if any(not 0 <= r["output_tokens"] <= max_new for r in records):
            self._refuse("judge", Counter({"token_count": len(records)}),
                         f"output_tokens must be in [0, {max_new}] for every record")
        return [Credit("tasks", 1), Credit("tokens_generated", float(sum(r["output_tokens"] for r in records)))]

    def commit(self, task_id, payload, data):
        records = {r["prompt_id"]: r for r in parse_records(data, JUDGE_FIELDS)}
        reasons, rows = Counter(), []
        for pair in payload["pairs"]:
            scores = parse_judgement(records[pair["prompt_id"]]["judgement"])
            rec = dpo_record(pair["messages"], tuple(pair["answers"]), scores, prompt_id=pair["prompt_id"],
                             lang=pair.get("lang"), task_id=task_id)
            if rec is None:
                reasons["unparseable" if scores is None else "tie"] += 1
            else:
                rows.append(rec)
        with self.state.lock:
            with open(self.state.dpo, "a", encoding="utf-8") as f:
                for rec in rows:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.state.count("judge", accepted=len(rows), tokens=sum(r["output_tokens"] for r in records.values()),
                             rejected=reasons)

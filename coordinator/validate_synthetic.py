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
record is appended to fingerprints.v2.bin and replayed at start-up.

Crash window. `commit` runs inside the transaction that records the result, so its side effects (records,
fingerprints, counters) reach the disk before that transaction commits; a kill -9 in between leaves them
without a completed task, and the worker uploads the same result again. Everything is therefore keyed by
task: each fingerprint carries its owner (a digest of the task's payload, which names the task's prompts,
answer and seed; `check_result` is given the payload, not the task id), each record its task id, and
journal.jsonl holds one line per upload judged (task, payload digest, counts), written before the other side
effects. A re-upload of the same task does not count its own stored records as duplicates, and its commit
replaces that task's earlier records and counts instead of adding to them: the dataset holds each record
once and the counters count it once. Two tasks with the same payload are the same work and are treated
alike. The records of a task whose Complete never commits and that is never completed again stay (once) in
the files; a torn last line or fingerprint from the crash is cut off at start-up. stats.json is the journal
folded (recomputed at start-up).
"""

from __future__ import annotations

import hashlib
import json
import os
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


def payload_owner(payload: dict) -> int:
    """The owner key of a task's records: the first 8 bytes of the SHA-256 of its canonical payload JSON."""
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(canon.encode("utf-8")).digest()[:8], "little")


def _cut_torn_tail(path: Path) -> None:
    """Truncate a JSON-lines file after its last newline: what a kill -9 in the middle of an append left."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            nl = f.read(end - start).rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            end = start
        if end != size:
            f.truncate(end)


def _append(path: Path, lines: list[str]) -> None:
    if lines:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(lines))


class SyntheticState:
    """One project's synthetic source: accepted records, DPO records, duplicate index, journal and counters.
    All methods are called under `lock`."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.generated, self.dpo = root / "generated.jsonl", root / "dpo.jsonl"
        self.fingerprints, self.stats_path = root / "fingerprints.v2.bin", root / "stats.json"
        self.journal = root / "journal.jsonl"
        self.lock = threading.Lock()
        self.dedup = Deduplicator()
        self._rec = np.dtype([("owner", "<u8"), ("key", "<u8"), ("sig", "<u4", (self.dedup.num_perm,))])
        self.docs_of: dict[int, list[int]] = {}  # payload owner -> its kept documents in `dedup`
        for path in (self.generated, self.dpo, self.journal):
            _cut_torn_tail(path)
        self._load_fingerprints()
        self._load_journal()

    # ---- start-up

    def _load_fingerprints(self) -> None:
        old = self.root / "fingerprints.bin"  # before owners were recorded: converted, as records of no task
        if old.exists():
            if not self.fingerprints.exists():
                raw = old.read_bytes()
                legacy = np.frombuffer(raw, dtype=[("key", "<u8"), ("sig", "<u4", (self.dedup.num_perm,))],
                                       count=len(raw) // (8 + 4 * self.dedup.num_perm))
                recs = np.zeros(len(legacy), dtype=self._rec)
                recs["key"], recs["sig"] = legacy["key"], legacy["sig"]
                tmp = self.fingerprints.with_suffix(".tmp")
                tmp.write_bytes(recs.tobytes())
                os.replace(tmp, self.fingerprints)
            old.unlink()
        if not self.fingerprints.exists():
            return
        size = self.fingerprints.stat().st_size
        if size % self._rec.itemsize:  # a torn last record (kill -9 mid-append): its upload never committed
            with open(self.fingerprints, "r+b") as f:
                f.truncate(size - size % self._rec.itemsize)
        for r in np.fromfile(self.fingerprints, dtype=self._rec):
            self._keep(int(r["owner"]), int(r["key"]), r["sig"].copy())

    def _keep(self, owner: int, key: int, sig: np.ndarray) -> bool:
        """Add a fingerprint to the index (False: an exact or near copy of a kept one, which already covers it)."""
        doc = len(self.dedup)
        if self.dedup.check_fingerprint(key, sig) is not None:
            return False
        self.docs_of.setdefault(owner, []).append(doc)
        return True

    def _load_journal(self) -> None:
        self.stats: dict = {}
        self.contrib: dict[str, dict] = {}  # task id -> its last committed upload's journal line
        self.tasks_of: dict[int, set[str]] = {}  # payload owner -> tasks whose commit counts
        if not self.journal.exists():
            try:  # a state dir from before the journal: its counters become one line per kind
                legacy = json.loads(self.stats_path.read_text())
            except (OSError, ValueError):
                legacy = {}
            _append(self.journal, [json.dumps({"kind": k, "accepted": v.get("accepted", 0),
                                               "tokens": v.get("tokens", 0), "rejected": v.get("rejected", {})})
                                   + "\n" for k, v in legacy.items() if isinstance(v, dict)])
        if self.journal.exists():
            with open(self.journal, encoding="utf-8") as f:
                for line in f:
                    self._fold(json.loads(line))
        self.write_stats()

    # ---- the journal and the counters

    def _fold(self, entry: dict, sign: int = 1) -> None:
        """Add (sign=1) or take back (-1) one journal line's counts; a commit replaces its task's earlier one and
        those of the tasks with the same payload."""
        if sign == 1 and "task" in entry:
            for task in self.replaced(entry["task"], entry["owner"]):
                self._fold(self.contrib.pop(task), -1)
            self.contrib[entry["task"]] = entry
            self.tasks_of.setdefault(entry["owner"], set()).add(entry["task"])
        elif sign == -1:
            self.tasks_of.get(entry["owner"], set()).discard(entry["task"])
        s = self.stats.setdefault(entry["kind"], {"accepted": 0, "tokens": 0, "rejected": {}})
        s["accepted"] += sign * entry.get("accepted", 0)
        s["tokens"] += sign * entry.get("tokens", 0)
        for reason, n in entry.get("rejected", {}).items():
            s["rejected"][reason] = s["rejected"].get(reason, 0) + sign * n
            if not s["rejected"][reason]:
                del s["rejected"][reason]

    def replaced(self, task_id: str, owner: int) -> set[str]:
        """The tasks whose committed records and counts a commit of `task_id` (payload owner `owner`) replaces:
        itself (an earlier upload whose transaction a crash undid) and the tasks with the same payload."""
        return ({task_id} & self.contrib.keys()) | self.tasks_of.get(owner, set())

    def count(self, kind: str, accepted: int = 0, tokens: int = 0, rejected: Counter | None = None,
              task_id: str | None = None, owner: int | None = None) -> None:
        """Journal one judged upload: a refusal (task_id None: its rejections add up), or the commit of
        `task_id`'s records (replacing the commits `replaced` names). `write_stats` publishes the counts."""
        entry: dict = {"kind": kind, "accepted": accepted, "tokens": tokens, "rejected": dict(rejected or {})}
        if task_id is not None:
            entry.update(task=task_id, owner=owner)
        with open(self.journal, "a", encoding="utf-8") as f:  # first: the other side effects follow it
            f.write(json.dumps(entry) + "\n")
        self._fold(entry)

    def write_stats(self) -> None:
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats, indent=1, sort_keys=True))
        tmp.replace(self.stats_path)

    # ---- records

    def drop_records(self, path: Path, tasks: set[str]) -> None:
        """Rewrite `path` without the lines of `tasks` (rare: only after a crash or for a repeated payload)."""
        if not tasks or not path.exists():
            return
        needles = [f"\"task_id\": {json.dumps(t, ensure_ascii=False)}" for t in tasks]
        tmp = path.with_suffix(".tmp")
        with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as out:
            for line in src:
                if any(n in line for n in needles) and json.loads(line).get("task_id") in tasks:
                    continue
                out.write(line)
        os.replace(tmp, path)

    def remember(self, owner: int, fps: list[tuple[int, np.ndarray]]) -> None:
        """Index and store the fingerprints of a task's accepted records (those already indexed are skipped)."""
        new = [(k, sig) for k, sig in fps if self._keep(owner, k, sig)]
        recs = np.zeros(len(new), dtype=self._rec)
        for i, (k, sig) in enumerate(new):
            recs[i] = (owner, k, sig)
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

    def _crash_point(self, where: str) -> None:
        """Called between the side effects of `commit` (tests kill the coordinator here, through a subclass)."""

    def _refuse(self, kind: str, reasons: Counter, message: str):
        if self.state is not None:
            with self.state.lock:
                self.state.count(kind, rejected=reasons)
                self.state.write_stats()
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
        """[(record, fingerprint)] of the records that pass, and the rejection reasons of the others. The records
        that this task's payload stored before (an upload whose transaction a crash undid) are not duplicates."""
        prompts = {p["id"]: p for p in payload["prompts"]}
        limits, max_new = payload["limits"], payload["sampling"].get("max_new_tokens", 1 << 30)
        own = frozenset(self.state.docs_of.get(payload_owner(payload), ()))
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
                reason = (self.state.dedup.check_fingerprint(*fp, remember=False, ignore=own)
                          or local.check_fingerprint(*fp))
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
        owner, st = payload_owner(payload), self.state
        with st.lock:
            ok, reasons = self._verdicts(payload, records)  # again: another result may have been accepted since
            replaced = st.replaced(task_id, owner)
            st.count("generate", accepted=len(ok), tokens=sum(r["output_tokens"] for r, _ in ok), rejected=reasons,
                     task_id=task_id, owner=owner)
            self._crash_point("commit:journal")
            st.drop_records(st.generated, replaced)
            st.remember(owner, [fp for _, fp in ok])
            self._crash_point("commit:fingerprints")
            lines = []
            for r, _ in ok:
                p = prompts[r["prompt_id"]]
                lines.append(json.dumps({
                    "id": f"{r['prompt_id']}/{r['answer']}", "prompt_id": r["prompt_id"], "answer": r["answer"],
                    "lang": p["lang"], "template": p.get("template"), "task_id": task_id,
                    "teacher": payload["teacher"]["name"], "output_tokens": r["output_tokens"],
                    "messages": [*p["messages"], {"role": "assistant", "content": r["output"]}]},
                    ensure_ascii=False) + "\n")
            _append(st.generated, lines)
            st.write_stats()
            self._crash_point("commit:written")


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
        reasons, lines = Counter(), []
        for pair in payload["pairs"]:
            scores = parse_judgement(records[pair["prompt_id"]]["judgement"])
            rec = dpo_record(pair["messages"], tuple(pair["answers"]), scores, prompt_id=pair["prompt_id"],
                             lang=pair.get("lang"), task_id=task_id)
            if rec is None:
                reasons["unparseable" if scores is None else "tie"] += 1
            else:
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        owner, st = payload_owner(payload), self.state
        with st.lock:
            replaced = st.replaced(task_id, owner)
            st.count("judge", accepted=len(lines), tokens=sum(r["output_tokens"] for r in records.values()),
                     rejected=reasons, task_id=task_id, owner=owner)
            self._crash_point("commit:journal")
            st.drop_records(st.dpo, replaced)
            _append(st.dpo, lines)
            st.write_stats()
            self._crash_point("commit:written")

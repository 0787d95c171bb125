"""Synthetic data without daemons: prompts, judge parsing, the generate/judge executors on the tiny teacher,
the validators' refusals through a real coordinator, and planning twice."""

from __future__ import annotations

import json

import grpc
import pytest
from sqlalchemy import func, select

from coordinator import store as S
from data_shards.synthetic import (
    build_prompts,
    check_output,
    dpo_record,
    load_personas,
    model_files_hash,
    parse_judgement,
)
from tests.conftest import REPO
from tests.coordinator.conftest import Coord
from tests.data_shards.corpus import english_documents, japanese_documents
from tests.worker.conftest import synthetic_section
from worker.executors import TaskContext, TaskError, WorkerFault, executor_for


def test_shipped_personas_and_prompts_are_deterministic():
    personas = [p for lang in ("ja", "en") for p in load_personas(REPO / "configs" / f"personas.{lang}.yaml")]
    assert {p.lang for p in personas} == {"ja", "en"} and len(personas) == 16
    seeds = [("ja", t) for t in japanese_documents(3)] + [("en", t) for t in english_documents(3)]
    a = build_prompts(personas, seeds, ["qa", "dialogue"], 50, seed=1)
    b = build_prompts(list(reversed(personas)), list(reversed(seeds)), ["qa", "dialogue"], 50, seed=1)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b] and len(a) == 50
    assert len({p.id for p in a}) == 50
    assert all(p.messages[0][0] == "system" and p.lang in p.persona for p in a)
    with pytest.raises(ValueError, match="unknown templates"):
        build_prompts(personas, seeds, ["poem"], 5)


def test_judgement_parsing_is_strict_and_robust():
    assert parse_judgement("reasons...\nScore A: 7\nScore B: 3") == (7, 3)
    assert parse_judgement("**Score A:** 8/10\n**score b**： 9") == (8, 9)
    for bad in ("", "A is better", "Score A: 7", "Score A: 7\nScore B: 11", "Score A: 7\nScore B: 3\nScore A: 2",
                "Score A: seven\nScore B: 3"):
        assert parse_judgement(bad) is None, bad
    msgs = [{"role": "user", "content": "q"}]
    assert dpo_record(msgs, ("x", "y"), (3, 8))["chosen"] == "y"
    assert dpo_record(msgs, ("x", "y"), (5, 5)) is None and dpo_record(msgs, ("x", "y"), None) is None


def test_output_checks_name_the_reason():
    ja, en = japanese_documents(1)[0], english_documents(1)[0]
    assert check_output(ja, "ja", min_chars=20, max_chars=5000) is None
    assert check_output(en, "ja", min_chars=20, max_chars=5000) == "language"
    assert check_output("短い。", "ja", min_chars=20, max_chars=5000) == "too_short"
    assert check_output("  ", "ja", min_chars=20, max_chars=5000) == "empty"
    assert check_output("同じ文です。" * 40, "ja", min_chars=20, max_chars=5000) is not None


def ctx_for(kind, payload, tmp_path, **kw):
    return TaskContext("t1", "l1", kind, payload, 1, tmp_path, **kw)


def test_generate_and_judge_executors_on_the_tiny_teacher(teacher_dir, tmp_path):
    prompts = [{"id": f"p{i}", "lang": "ja", "messages": [{"role": "user", "content": f"質問{i}"}]} for i in range(3)]
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 40, "seed": 7}
    payload = {"teacher": {"name": "tiny", "sha256": model_files_hash(teacher_dir)}, "answer": 1, "prompts": prompts,
               "sampling": sampling, "batch_size": 2}
    seen = []
    r = executor_for("generate")(ctx_for("generate", payload, tmp_path, teachers={"tiny": teacher_dir},
                                         report_progress=seen.append))
    recs = [json.loads(line) for line in r.data.decode().splitlines()]
    assert [x["prompt_id"] for x in recs] == ["p0", "p1", "p2"] and seen == [2 / 3, 1.0]
    assert all(x["output_tokens"] == 40 and x["engine"] == "transformers" and x["answer"] == 1 for x in recs)
    assert {x["model_sha256"] for x in recs} == {model_files_hash(teacher_dir)}
    assert r.metrics == {"records": 3.0, "output_tokens": 120.0}
    again = executor_for("generate")(ctx_for("generate", payload, tmp_path, teachers={"tiny": teacher_dir}))
    assert again.data == r.data  # the task's seed decides the sample
    retried = executor_for("generate")(TaskContext("t1", "l2", "generate", payload, 2, tmp_path,
                                                   teachers={"tiny": teacher_dir}))
    assert retried.data != r.data  # a retry samples afresh: a refused sample is not drawn again
    pairs = [{"prompt_id": "p0", "lang": "ja", "messages": prompts[0]["messages"], "answers": ["あ", "い"]}]
    j = executor_for("judge")(ctx_for("judge", {"teacher": {"name": "tiny", "path": str(teacher_dir), "sha256": ""},
                                                "pairs": pairs, "sampling": {"temperature": 0.0,
                                                                             "max_new_tokens": 12}}, tmp_path,
                                      local_paths=(teacher_dir.parent.resolve(),)))
    rec = json.loads(j.data)
    assert rec["verdict"] == "unparseable" and rec["scores"] is None  # the bigram teacher writes no scores


def test_missing_teacher_is_a_worker_fault_and_bad_payloads_are_task_errors(tmp_path):
    payload = {"teacher": {"name": "gone", "sha256": "0" * 64, "path": str(tmp_path / "nope")},
               "prompts": [{"id": "p", "messages": []}], "sampling": {"max_new_tokens": 5}}
    with pytest.raises(WorkerFault, match="does not exist on this worker.*--teacher gone=DIR"):
        executor_for("generate")(ctx_for("generate", payload, tmp_path, local_paths=(tmp_path,)))
    with pytest.raises(WorkerFault, match="no teacher 'gone'.*--allow-local-paths"):
        executor_for("generate")(ctx_for("generate", payload, tmp_path))
    with pytest.raises(TaskError, match="needs a CUDA device"):
        executor_for("generate")(ctx_for("generate", {**payload, "teacher": {"name": "t", "path": str(tmp_path)},
                                                      "sampling": {"max_new_tokens": 5, "quantize": "4bit"}},
                                         tmp_path, local_paths=(tmp_path,)))
    with pytest.raises(TaskError, match="prompts"):
        executor_for("generate")(ctx_for("generate", {"sampling": {}}, tmp_path))


# ---- validators through a real coordinator ------------------------------------------------------------

TEACHER = {"name": "tiny", "sha256": "a" * 64}


def gen_payload(ids, lang="ja"):
    return {"teacher": TEACHER, "answer": 0, "limits": {"min_chars": 20, "max_chars": 5000},
            "sampling": {"max_new_tokens": 2000}, "batch_size": 2,
            "prompts": [{"id": i, "lang": lang, "template": "qa", "messages": [{"role": "user", "content": "q"}]}
                        for i in ids]}


def upload(ids, outputs, sha=TEACHER["sha256"]):
    return "".join(json.dumps({"prompt_id": i, "answer": 0, "output": o, "prompt_tokens": 3, "output_tokens": 100,
                               "engine": "transformers", "model_sha256": sha}, ensure_ascii=False) + "\n"
                   for i, o in zip(ids, outputs, strict=True)).encode()


@pytest.fixture
def scoord(tmp_path, teacher_dir):
    c = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}",
              synthetic=synthetic_section(tmp_path, teacher_dir))
    yield c
    c.close()


def lease_one(coord, c, kind="generate"):
    wid = c.register("w").worker_id
    return c.lease(wid, [kind]).task


def refused(c, t, data, needle):
    with pytest.raises(grpc.RpcError) as e:
        c.complete(t.task_id, t.lease_id, data, {"output_tokens": 1.0})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details(), e.value.details()


def ledger_total(coord):
    with coord.store.read() as conn:
        return conn.execute(select(func.count()).select_from(S.ledger)).scalar_one()


def test_generate_validator_refuses_bad_uploads_and_duplicates(scoord, tmp_path):
    from coordinator.validate_synthetic import SyntheticState

    ja = japanese_documents(6, seed=11)
    c = scoord.client()

    def fresh():  # a token whose result was refused is not given that task again: one task per case
        scoord.scheduler.add_task("generate", gen_payload(["a", "b"]), max_attempts=10)
        return lease_one(scoord, c)

    refused(c, fresh(), b"\xff\xfe garbage", "not UTF-8")
    refused(c, fresh(), b'{"prompt_id": "a"}\n', "field 'answer'")
    refused(c, fresh(), upload(["a"], ja[:1]), "cover each of the task's 2 prompts")
    refused(c, fresh(), upload(["a", "b"], ja[:2], sha="b" * 64), "does not match the task's teacher")
    refused(c, fresh(), upload(["a", "b"], english_documents(2)), "language 2")
    synthetic = scoord.cfg.state_dir / "synthetic"
    assert ledger_total(scoord) == 0 and not (synthetic / "generated.jsonl").exists()
    t = fresh()
    ok = c.complete(t.task_id, t.lease_id, upload(["a", "b"], [ja[0], "短すぎる"]), {"output_tokens": 200.0})
    assert ok.accepted and ok.credited
    with scoord.store.read() as conn:
        credit = dict(conn.execute(select(S.ledger.c.unit, S.ledger.c.amount)).all())
    assert credit == {"tasks": 1.0, "tokens_generated": 100.0}  # only the accepted record's tokens
    rows = [json.loads(x) for x in (synthetic / "generated.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a/0"] and rows[0]["messages"][-1]["content"] == ja[0]
    # the same text again, for another task: a duplicate, also after a coordinator restart
    scoord.scheduler.add_task("generate", gen_payload(["c", "d"]), max_attempts=10)
    t = lease_one(scoord, c)
    refused(c, t, upload(["c", "d"], [ja[0], ja[0]]), "exact_duplicate 2")
    reloaded = SyntheticState(synthetic)
    assert reloaded.dedup.check(ja[0]) == "exact_duplicate" and reloaded.dedup.check(ja[3]) is None
    stats = json.loads((synthetic / "stats.json").read_text())["generate"]
    assert stats["accepted"] == 1 and stats["rejected"]["model_hash"] == 2 and stats["rejected"]["language"] == 2
    from tests.coordinator.conftest import coordinator_cli

    out = coordinator_cli("status", "--config", str(scoord.project)).stdout
    assert "synthetic generate: 1 records accepted, 100 tokens; rejected:" in out and "exact_duplicate 2" in out


def test_plan_is_idempotent_and_adds_judge_tasks_when_pairs_exist(scoord, teacher_dir):
    from coordinator.plan import plan

    first = plan(scoord.cfg, scoord.scheduler)
    assert first["generate"] == 4 and first["prompts"] == 8 and first["judge"] == 0
    assert plan(scoord.cfg, scoord.scheduler)["generate"] == 0
    with scoord.store.read() as conn:
        payloads = [json.loads(p) for p in conn.execute(select(S.tasks.c.payload)).scalars()]
    assert {p["teacher"]["sha256"] for p in payloads} == {model_files_hash(teacher_dir)}
    assert len({p["sampling"]["seed"] for p in payloads}) == 4  # a seed per task
    generated = scoord.cfg.state_dir / "synthetic" / "generated.jsonl"
    generated.parent.mkdir(parents=True, exist_ok=True)
    pid = payloads[0]["prompts"][0]["id"]
    rows = [{"prompt_id": pid, "answer": a, "lang": "ja", "messages": [{"role": "user", "content": "q"},
                                                                       {"role": "assistant", "content": f"ans{a}"}]}
            for a in (0, 1)]
    generated.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = plan(scoord.cfg, scoord.scheduler)
    assert second == {"generate": 0, "judge": 1, "prompts": 8, "shards": 0}
    assert plan(scoord.cfg, scoord.scheduler)["judge"] == 0


def test_project_file_with_synthetic_section_and_its_errors(tmp_path, teacher_dir):
    from coordinator.config import load_project
    from tests.coordinator.conftest import write_project

    cfg = load_project(write_project(tmp_path, synthetic=synthetic_section(tmp_path, teacher_dir)))
    assert cfg.synthetic.teacher.name == "tiny" and cfg.synthetic.templates == ["qa", "summary"]
    bad = synthetic_section(tmp_path, teacher_dir, templates=["poem"])
    with pytest.raises(ValueError, match="unknown \\['poem'\\]"):
        load_project(write_project(tmp_path, synthetic=bad))
    bad = {**synthetic_section(tmp_path, teacher_dir), "teacher": {"name": "x"}}
    with pytest.raises(ValueError, match="give `path`"):
        load_project(write_project(tmp_path, synthetic=bad))

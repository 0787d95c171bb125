"""Faults of the volunteer's own machine (issue 19 item 1): a teacher missing or without a chat template is
reported as WORKER_FAULT, which costs the task no attempt; the worker stops leasing that kind, says why in one
line, and exits 2 when nothing is left it can run: no Lease + Fail storm (the issue saw 1,069 attempts in 25 s).
Also the command-line mistakes that used to idle or retry forever: an unknown kind, an address without a port;
and `doctor`, which now loads every teacher instead of saying "generate ok" blindly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator import store as S
from coordinator.plan import plan
from data_shards.synthetic import model_files_hash
from tests.coordinator.conftest import TOKEN, Coord
from tests.worker.conftest import run_worker, spawn_worker, synthetic_section
from worker.cli import main


def without_chat_template(teacher: Path, out: Path) -> Path:
    """A copy of the tiny teacher whose tokenizer has no chat template (a base model's directory)."""
    shutil.copytree(teacher, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def tasks_and_failures(coord) -> tuple[list[tuple], list[tuple]]:
    with coord.store.read() as conn:
        tasks = conn.execute(select(S.tasks.c.kind, S.tasks.c.state, S.tasks.c.attempts)).all()
        fails = conn.execute(select(S.failures.c.reason, S.failures.c.message)).all()
    return [tuple(t) for t in tasks], [tuple(f) for f in fails]


def add_judge_task(coord, teacher: Path) -> None:
    pairs = [{"prompt_id": "p0", "lang": "ja", "messages": [{"role": "user", "content": "質問"}],
              "answers": ["あ", "い"]}]
    coord.scheduler.add_task("judge", {"teacher": {"name": "tiny", "sha256": model_files_hash(teacher)},
                                       "pairs": pairs, "sampling": {"temperature": 0.0, "max_new_tokens": 8}})


@pytest.mark.slow  # a coordinator and a spawned worker
def test_a_teacher_without_chat_template_costs_one_fail_and_the_worker_exits_2(tmp_path, teacher_dir):
    bare = without_chat_template(teacher_dir, tmp_path / "bare")  # the project's teacher is this very directory
    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}",
                  synthetic=synthetic_section(tmp_path, bare))
    try:
        assert plan(coord.cfg, coord.scheduler)["generate"] == 4
        log = tmp_path / "w.log"
        proc = spawn_worker(coord.target, tmp_path / "w", "--kinds", "generate", "--teacher", f"tiny={bare}", log=log)
        assert proc.wait(timeout=120) == 2, log.read_text()
        text = log.read_text()
        tasks, fails = tasks_and_failures(coord)
        assert tasks == [("generate", "pending", 0)] * 4, tasks   # nothing charged to the tasks
        assert [r for r, _ in fails] == ["WORKER_FAULT"] and "no chat template" in fails[0][1]
        reason = [ln for ln in text.splitlines() if "fix it or run without --kinds generate" in ln]
        assert len(reason) == 1 and f"no chat template in {bare}/tokenizer_config.json" in reason[0], text
        assert "no task kind left that this worker can run" in text and "Traceback" not in text
    finally:
        coord.close()


@pytest.mark.slow  # a coordinator and a spawned worker
def test_a_missing_teacher_dir_costs_one_fail_per_kind_and_then_the_same_worker_set_right_works(tmp_path,
                                                                                               teacher_dir):
    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}",
                  synthetic=synthetic_section(tmp_path, teacher_dir, max_prompts=4))
    try:
        assert plan(coord.cfg, coord.scheduler)["generate"] == 2
        add_judge_task(coord, teacher_dir)
        log = tmp_path / "w.log"
        proc = spawn_worker(coord.target, tmp_path / "w", "--kinds", "generate,judge", "--teacher",
                            f"tiny={tmp_path / 'not-downloaded'}", log=log)
        assert proc.wait(timeout=120) == 2, log.read_text()
        text = log.read_text()
        tasks, fails = tasks_and_failures(coord)
        assert sorted(tasks) == [("generate", "pending", 0)] * 2 + [("judge", "pending", 0)], tasks
        assert [r for r, _ in fails] == ["WORKER_FAULT", "WORKER_FAULT"], fails   # one per kind, not per task
        for kind in ("generate", "judge"):
            lines = [ln for ln in text.splitlines() if f"fix it or run without --kinds {kind}" in ln]
            assert len(lines) == 1 and "not-downloaded" in lines[0] and "does not exist" in lines[0], text
        # the volunteer fixes the path: the same tasks run (none was charged an attempt or went dead)
        run_worker(coord.target, tmp_path / "w", "--kinds", "generate", "--teacher", f"tiny={teacher_dir}",
                   "--max-tasks", "2")
        tasks, _ = tasks_and_failures(coord)
        assert sorted(t[:2] for t in tasks if t[0] == "generate") == [("generate", "done")] * 2, tasks
    finally:
        coord.close()


def test_an_unknown_kind_or_an_address_without_port_is_a_clear_exit_2(tmp_path, capsys):
    base = ["run", "--token", TOKEN, "--cache-dir", str(tmp_path), "--no-benchmark"]
    assert main([*base, "--coordinator", "127.0.0.1:1", "--kinds", "generat"]) == 2
    err = capsys.readouterr().err
    assert "--kinds generat: no such task kind; known: generate, judge, eval, train" in err
    assert main([*base, "--coordinator", "127.0.0.1"]) == 2
    assert "--coordinator '127.0.0.1': write HOST:PORT" in capsys.readouterr().err
    assert main(["doctor", "--no-benchmark", "--coordinator", "coordinator.example.org", "--token", "x"]) == 2
    assert "write HOST:PORT" in capsys.readouterr().err
    assert main([*base, "--coordinator", "127.0.0.1:1", "--allow-local-paths", str(tmp_path / "nope")]) == 2
    assert f"--allow-local-paths {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err


def test_doctor_loads_every_teacher_and_says_what_is_wrong(tmp_path, teacher_dir, capsys):
    bare = without_chat_template(teacher_dir, tmp_path / "bare")
    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir, broken)
    (broken / "config.json").write_text("{not json")
    args = ["doctor", "--json", "--no-benchmark", "--cache-dir", str(tmp_path), "--kinds", "generate,judge,eval"]
    assert main([*args, "--teacher", f"tiny={teacher_dir}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["teachers"] == {"tiny": ""} and report["kinds"]["generate"] == report["kinds"]["judge"] == ""
    (tmp_path / "worker.toml").write_text(f'[teachers]\nbare = "{bare}"\ngone = "{tmp_path / "gone"}"\n')
    assert main([*args, "--config", str(tmp_path / "worker.toml"), "--teacher", f"broken={broken}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "no chat template" in report["teachers"]["bare"]
    assert "does not exist" in report["teachers"]["gone"]
    assert "config.json cannot be read" in report["teachers"]["broken"]
    assert "teacher 'bare'" in report["kinds"]["generate"] and report["kinds"]["eval"] == ""
    assert main(["doctor", "--no-benchmark", "--cache-dir", str(tmp_path), "--kinds", "generate"]) == 1
    out = capsys.readouterr().out
    assert "kind     generate  no: no teacher: pass --teacher NAME=DIR" in out and "cannot run" in out


def test_a_missing_package_and_a_wrong_teacher_are_worker_faults_through_the_daemon(tmp_path, teacher_dir, serve,
                                                                                    monkeypatch):
    """In-process daemon against a minimal coordinator (tests/worker/hostile.py): transformers not importable
    (what a volunteer without it sees) is WORKER_FAULT naming the package; a teacher directory holding other
    files than the project's is WORKER_FAULT naming both hashes. Each drops its kind; the daemon returns 2."""
    from tests.worker.hostile import Hostile
    from worker.daemon import Daemon, WorkerConfig

    def generate(sha: str) -> tuple[str, dict]:
        return ("generate", {"teacher": {"name": "tiny", "sha256": sha}, "answer": 0,
                             "prompts": [{"id": "p0", "lang": "ja", "messages": [{"role": "user", "content": "q"}]}],
                             "sampling": {"temperature": 1.0, "max_new_tokens": 4, "seed": 0}})

    def run(h: Hostile, teacher: Path, cache: str) -> int:
        cfg = WorkerConfig(coordinator=serve(h), token=TOKEN, cache_dir=tmp_path / cache, benchmark=False,
                           kinds=["generate"], teachers={"tiny": teacher})
        return Daemon(cfg).run()

    copy = shutil.copytree(teacher_dir, tmp_path / "copy")  # a new directory: no engine cached for it
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
        h = Hostile(tasks=[generate(model_files_hash(copy))] * 3)
        assert run(h, copy, "a") == 2
    assert [r for r, _ in h.fails] == ["WORKER_FAULT"] and "pip install transformers" in h.fails[0][1]
    assert len(h.tasks) == 2   # the other two were never leased
    h = Hostile(tasks=[generate("ab" * 32)] * 3)
    assert run(h, teacher_dir, "b") == 2
    assert [r for r, _ in h.fails] == ["WORKER_FAULT"] and "not the project's" in h.fails[0][1]


def test_out_of_memory_twice_in_a_row_makes_the_kind_a_fault_of_this_machine(tmp_path, serve):
    """One OUT_OF_MEMORY is the task's (it may fit a bigger machine, and is not given to this token again); a
    second in a row on the same kind is this machine's: the kind is dropped, so a worker whose memory cannot hold
    the project's tasks does not fail them one by one. The fault is injected as the executor's exception (CPU
    torch raises no torch.OutOfMemoryError of its own)."""
    import torch

    from tests.worker.hostile import Hostile
    from worker.daemon import Daemon, WorkerConfig

    def out_of_memory(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    h = Hostile(tasks=[("eval", {"checkpoint": "c", "shard": "s", "shard_tokens": 1, "seq_len": 8})] * 4)
    d = Daemon(WorkerConfig(coordinator=serve(h), token=TOKEN, cache_dir=tmp_path, benchmark=False, kinds=["eval"]))
    d.executors._built["eval"] = out_of_memory
    assert d.run() == 2
    assert [r for r, _ in h.fails] == ["OUT_OF_MEMORY", "OUT_OF_MEMORY"] and len(h.tasks) == 2

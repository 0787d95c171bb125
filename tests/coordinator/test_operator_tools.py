"""The organizer's tools, through `mujina-coordinator` as a user runs it (issue 19, item 9): `tasks cancel`
and `tasks retry` over filters, `plan` retiring tasks planned with a teacher whose files changed, and every
user error as one line naming the file, field or port and the fix, with exit status 2 (never a traceback)."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import REPO
from tests.coordinator.conftest import coordinator_cli, free_port, write_project

# a generate payload the validator accepts (the teacher's hash is a placeholder: nobody runs these tasks)
GENERATE = json.dumps({"teacher": {"name": "tiny", "sha256": "0" * 64}, "sampling": {}, "limits": {},
                       "prompts": [{"id": "p0", "lang": "ja", "messages": [{"role": "user", "content": "?"}]}]})

EVAL = json.dumps({"checkpoint": "c", "shard": "s.bin", "shard_tokens": 8})


def _tasks(common) -> dict[str, dict]:
    listing = coordinator_cli("tasks", "list", "--json", *common).stdout.splitlines()
    return {r["id"]: r for r in map(json.loads, listing)}


@pytest.mark.slow  # a dozen CLI runs
def test_cancel_and_retry_over_filters_and_ids(tmp_path):
    project = write_project(tmp_path)
    common = ("--config", str(project))
    gen = coordinator_cli("tasks", "add", "--kind", "generate", "--payload", GENERATE, "--count", "3",
                          *common).stdout.split()
    ev = coordinator_cli("tasks", "add", "--kind", "eval", "--payload", EVAL, "--count", "2", *common).stdout.split()

    out = coordinator_cli("tasks", "cancel", "--kind", "generate", *common)
    assert out.stdout.strip() == "cancelled 3 tasks"
    rows = _tasks(common)
    assert {rows[t]["state"] for t in gen} == {"dead"} and {rows[t]["state"] for t in ev} == {"pending"}
    assert rows[gen[0]]["last_error"].startswith("CANCELLED: cancelled by the organizer")

    # the recovery the issue asked for: one command, not one per task
    out = coordinator_cli("tasks", "retry", "--state", "dead", "--kind", "generate", *common)
    assert out.stdout.startswith("retried 3 tasks: pending again")
    assert {r["state"] for r in _tasks(common).values()} == {"pending"}

    assert coordinator_cli("tasks", "cancel", "--all", *common).stdout.strip() == "cancelled 5 tasks"
    assert coordinator_cli("tasks", "cancel", "--all", *common).stdout.strip() == "cancelled 0 tasks"
    assert coordinator_cli("tasks", "retry", ev[0], gen[1], *common).stdout.startswith("retried 2 tasks")
    rows = _tasks(common)
    assert {t for t, r in rows.items() if r["state"] == "pending"} == {gen[1], ev[0]}
    assert rows[gen[1]]["attempts"] == 0
    # explicit ids of tasks already dead: cancelled 0 of 1
    assert coordinator_cli("tasks", "cancel", gen[0], *common).stdout.strip() == \
        "cancelled 0 tasks (1 already done or dead)"
    assert coordinator_cli("tasks", "retry", "--all", *common).stdout.startswith("retried 3 tasks")

    # a misspelt kind changes nothing and says which kinds exist
    typo = coordinator_cli("tasks", "retry", "--kind", "generat", *common)
    assert typo.stdout.startswith("retried 0 tasks") and "kinds are: eval, generate" in typo.stderr


@pytest.mark.parametrize("args, needle", [
    ((), "name the tasks either by id"),                         # no selector: refuse to guess
    (("some-id", "--all"), "not both"),                           # ids and a filter
    (("no-such-task",), "unknown task id(s) no-such-task"),
])
def test_cancel_and_retry_refuse_unclear_selections(tmp_path, args, needle):
    project = write_project(tmp_path)
    for action in ("cancel", "retry"):
        _one_line_error(coordinator_cli("tasks", action, *args, "--config", str(project), check=False), needle)


@pytest.mark.slow  # five CLI runs
def test_retry_of_a_leased_or_done_task_changes_nothing(tmp_path):
    from coordinator.config import load_project
    from coordinator.scheduler import Scheduler
    from coordinator.store import Store

    project = write_project(tmp_path)
    common = ("--config", str(project))
    a, b = coordinator_cli("tasks", "add", "--kind", "eval", "--payload", EVAL, "--count", "2", *common).stdout.split()
    cfg = load_project(project)
    store = Store.open(cfg.db_url())
    sched = Scheduler(store, cfg)
    store.add_token("carol", "mj_carol", None)
    wid = sched.register("mj_carol", "box", {}, 0, False, 1.0)
    assert sched.lease("mj_carol", wid, ["eval"]).task_id == a  # a is leased now
    store.close()
    coordinator_cli("tasks", "cancel", b, *common)
    out = coordinator_cli("tasks", "retry", a, b, *common, check=False)
    assert out.returncode == 2 and f"{a} (leased)" in out.stderr
    assert _tasks(common)[b]["state"] == "dead"  # nothing changed
    # cancelling the leased task ends its lease too
    assert coordinator_cli("tasks", "cancel", "--state", "leased", *common).stdout.strip() == "cancelled 1 task"
    assert _tasks(common)[a]["state"] == "dead"


def _synthetic_project(tmp_path, teacher):
    import yaml

    from tests.data_shards.corpus import japanese_documents, write_jsonl

    seeds = write_jsonl(tmp_path / "seeds.jsonl", japanese_documents(4, seed=5))
    project = write_project(tmp_path)
    doc = yaml.safe_load(project.read_text())
    doc["synthetic"] = {"personas": [str(REPO / "configs" / "personas.ja.yaml")], "seeds": [str(seeds)],
                        "languages": ["ja"], "templates": ["qa"], "teacher": {"name": "tiny", "path": str(teacher)},
                        "batch_size": 4, "max_prompts": 8}
    project.write_text(yaml.safe_dump(doc))
    return project


@pytest.mark.slow  # six CLI runs
def test_plan_retires_pending_tasks_of_a_teacher_whose_files_changed(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"old weights")
    project = _synthetic_project(tmp_path, teacher)
    common = ("--config", str(project))
    first = coordinator_cli("plan", *common).stdout
    assert "added 4 generate" in first and "retired" not in first
    before = _tasks(common)
    assert coordinator_cli("plan", *common).stdout.count("added 0 generate") == 1  # idempotent
    leased = next(iter(before))
    from coordinator.config import load_project
    from coordinator.scheduler import Scheduler
    from coordinator.store import Store

    cfg = load_project(project)
    store = Store.open(cfg.db_url())
    sched = Scheduler(store, cfg)
    store.add_token("carol", "mj_carol", None)
    leased = sched.lease("mj_carol", sched.register("mj_carol", "box", {}, 0, False, 1.0), ["generate"]).task_id
    store.close()

    (teacher / "model.safetensors").write_bytes(b"new weights")  # the organizer replaced the teacher
    out = coordinator_cli("plan", *common).stdout
    old = json.loads(coordinator_cli("tasks", "list", "--json", *common).stdout.splitlines()[0])["payload"]
    old_hash = old["teacher"]["sha256"]
    assert f"retired 3 pending generate tasks planned with teacher tiny's old hash {old_hash[:12]}" in out
    assert "added 4 generate" in out
    after = _tasks(common)
    assert after[leased]["state"] == "leased"  # a leased task is left to finish or fail
    retired = [t for t in before if t != leased]
    assert all(after[t]["state"] == "dead" and "teacher tiny's files changed" in after[t]["last_error"]
               for t in retired)
    fresh = [r for t, r in after.items() if t not in before]
    assert len(fresh) == 4 and {r["payload"]["teacher"]["sha256"] for r in fresh} != {old_hash}
    assert "retired" not in coordinator_cli("plan", *common).stdout


def _one_line_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("mujina-coordinator:")]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "project.yaml"
    f.write_text("run: demo\nleases:\n  duration_s: 60\n   heartbeat_interval_s: 10\n")
    _one_line_error(coordinator_cli("status", "--config", str(f), check=False), str(f), "line 4", "not valid YAML")
    f.write_text("run: demo\nserver: {listen: [127.0.0.1\n")
    _one_line_error(coordinator_cli("tasks", "list", "--config", str(f), check=False), str(f), "line 3")


def test_missing_project_file_and_directory(tmp_path):
    _one_line_error(coordinator_cli("plan", "--config", str(tmp_path / "nope.yaml"), check=False),
                    "nope.yaml not found", "configs/project.yaml")
    _one_line_error(coordinator_cli("status", "--config", str(tmp_path), check=False), "is a directory")


@pytest.mark.slow  # three CLI runs, one waiting for a refused connection
def test_a_store_that_cannot_be_opened(tmp_path):
    project = write_project(tmp_path)
    (tmp_path / "file").write_text("")
    unmakeable = tmp_path / "project-bad-state.yaml"
    unmakeable.write_text(f"run: x\nstate_dir: {tmp_path / 'file' / 'state'}\n")  # under a plain file
    _one_line_error(coordinator_cli("status", "--config", str(unmakeable), check=False),
                    str(tmp_path / "file"), f"in {unmakeable}")
    _one_line_error(coordinator_cli("status", "--config", str(project), "--db", "nosuchdb://x", check=False),
                    "--db nosuchdb://x: unsupported database")
    nobody = f"postgresql+psycopg://mujina@127.0.0.1:{free_port()}/mujina"  # nothing listens there
    _one_line_error(coordinator_cli("tasks", "list", "--config", str(project), "--db", nobody, check=False),
                    "could not be opened", "check --db")


@pytest.mark.slow  # starts `serve` (which exits at once) three times
def test_a_port_in_use_names_the_flag_and_the_port(tmp_path):
    project = write_project(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = coordinator_cli("serve", "--config", str(project), "--listen", f"127.0.0.1:{port}", check=False,
                              timeout=60)
        _one_line_error(out, "--listen", f"127.0.0.1:{port}", "in use", "pick another --listen")
        out = coordinator_cli("serve", "--config", str(project), "--listen", f"127.0.0.1:{free_port()}",
                              "--metrics-port", str(port), check=False, timeout=60)
        _one_line_error(out, f"cannot listen on 127.0.0.1:{port}", "pick another --metrics-port")
    bad = coordinator_cli("serve", "--config", str(project), "--listen", "127.0.0.1", check=False, timeout=60)
    _one_line_error(bad, "--listen must be HOST:PORT")
    bad = coordinator_cli("serve", "--config", str(project), "--listen", "127.0.0.1:0", "--http-port", "0",
                          "--http-host", "no-such-host.invalid", check=False, timeout=60)
    _one_line_error(bad, "--http-host: 'no-such-host.invalid' is not a host name or address")


@pytest.mark.slow  # two CLI runs and a plan
def test_the_shipped_synthetic_example_plans_and_its_hash_is_as_documented(tmp_path):
    """configs/project.yaml's commented `synthetic:` example, uncommented, with the files it names: `plan` adds its
    tasks, and the teacher hash in them is the one its comment describes, computed here by hand."""
    import hashlib
    import re
    import shutil

    import yaml

    from tests.data_shards.corpus import japanese_documents, write_jsonl

    text = (REPO / "configs" / "project.yaml").read_text()
    block = re.search(r"^# synthetic:\n((?:#   .*\n)+)", text, re.M)
    synthetic = yaml.safe_load("synthetic:\n" + "".join(line[1:] + "\n" for line in block.group(1).splitlines()))
    assert synthetic["synthetic"]["teacher"] == {"name": "teacher", "path": "../models/teacher"}
    # the files the example names, where it names them (relative to the project file)
    (tmp_path / "configs").mkdir()
    for f in synthetic["synthetic"]["personas"]:
        shutil.copy(REPO / "configs" / f, tmp_path / "configs" / f)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "seeds.jsonl", japanese_documents(4, seed=5))
    teacher = tmp_path / "models" / "teacher"
    (teacher / "sub").mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": b"weights", "sub/tokenizer.json": b"tok"}
    for rel, data in files.items():
        (teacher / rel).write_bytes(data)
    (teacher / ".cache").mkdir()
    (teacher / ".cache" / "x").write_bytes(b"left out")
    project = tmp_path / "configs" / "project.yaml"
    project.write_text(yaml.safe_dump({"run": "demo", "state_dir": "../state",
                                       "synthetic": {**synthetic["synthetic"], "languages": ["ja"],
                                                     "max_prompts": 16}}))
    out = coordinator_cli("plan", "--config", str(project)).stdout
    assert "added 4 generate" in out, out
    # the documented hash: SHA-256 of "RELATIVE_PATH\0SHA256\n" per file, sorted by path, hidden names left out
    lines = "".join(f"{rel}\0{hashlib.sha256(files[rel]).hexdigest()}\n" for rel in sorted(files))
    payload = json.loads(coordinator_cli("tasks", "list", "--json", "--config", str(project)).stdout.splitlines()[0])
    assert payload["payload"]["teacher"]["sha256"] == hashlib.sha256(lines.encode()).hexdigest()

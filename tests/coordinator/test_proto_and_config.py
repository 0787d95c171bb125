"""The committed protocol modules equal a regeneration; the shipped project file loads; bad project
files fail with the field and the fix named (STYLE.md rules 4 and 5)."""

from __future__ import annotations

import pytest

from coordinator.api import generate
from coordinator.config import ProjectConfig, load_project
from tests.conftest import REPO


def test_committed_generated_protocol_is_fresh(tmp_path):
    # Reference: grpc_tools.protoc at the pinned grpcio-tools version, run by coordinator/api/generate.py.
    for fresh in generate.generate(tmp_path):
        committed = REPO / "coordinator" / "api" / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.relative_to(REPO)} is stale: run `python -m coordinator.api.generate` and commit")


def test_generated_grpc_module_imports_its_messages_relatively():
    text = (REPO / "coordinator/api/mujina_pb2_grpc.py").read_text()
    assert "from . import mujina_pb2 as" in text and "\nimport mujina_pb2" not in text


def test_shipped_project_file_loads():
    cfg = load_project(REPO / "configs" / "project.yaml")
    assert isinstance(cfg, ProjectConfig) and cfg.run == "demo"
    assert cfg.state_dir.is_absolute() and cfg.leases.heartbeat_interval_s < cfg.leases.duration_s
    assert cfg.db_url().startswith("sqlite:///")


@pytest.mark.parametrize("text, needle", [
    ("run: x\nleases: {duration_s: 60, heartbeat_intervall_s: 5}\n",
     "leases.heartbeat_intervall_s: unknown key; remove it or check its spelling"),
    ("run: x\nleases: {duration_s: 5, heartbeat_interval_s: 10}\n",
     "leases.heartbeat_interval_s (10.0) must be below leases.duration_s (5.0)"),
    ("run: x\nserver: {tls_cert: a.pem}\n", "server.tls_cert and server.tls_key go together"),
    ("run: x\nserver: {listen: nowhere}\n", "server.listen must be HOST:PORT"),
    ("run: x\nlimits: {max_leases_per_token: 0}\n", "limits.max_leases_per_token"),
    ("state_dir: s\n", "run: Field required"),
    ("- a list\n", "a project file is a YAML mapping"),
])
def test_bad_project_files_name_field_and_fix(tmp_path, text, needle):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as err:
        load_project(f)
    assert needle in str(err.value), str(err.value)

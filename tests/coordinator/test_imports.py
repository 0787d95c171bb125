"""Import boundaries: the worker may use coordinator/api (protocol + client) without the rest of the
coordinator (DESIGN.md, Layout), and the coordinator starts without importing torch."""

import subprocess
import sys

from tests.conftest import REPO


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_api_client_needs_only_grpc_and_protobuf():
    loaded = _loaded_after("import coordinator.api.client")
    assert not loaded & {"sqlalchemy", "pydantic", "prometheus_client", "torch", "yaml"}, loaded
    code = "import sys, coordinator.api.client; print(sorted(m for m in sys.modules if m.startswith('coordinator')))"
    mods = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "coordinator.server" not in mods and "coordinator.store" not in mods


def test_coordinator_server_does_not_import_torch():
    assert "torch" not in _loaded_after("import coordinator.cli, coordinator.server")

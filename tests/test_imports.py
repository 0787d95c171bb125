"""The dependency direction of DESIGN.md, read from the source (every import statement, at module level or
inside a function): data_shards -> model -> swarm -> coordinator | worker, and no import circles.

    swarm/        imports neither coordinator nor worker
    coordinator/  imports no worker
    worker/       imports only coordinator.api of the coordinator
    model/, data_shards/  stay pure (tests/test_purity.py)

And what the coordinator loads: it validates a project with a `swarm:` section, builds round payloads and
validates them without torch or hivemind (a swarm run's bootstrap peer and round driver load them lazily).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("model", "data_shards", "swarm", "coordinator", "worker")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its source (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m.split(".")[0] in PACKAGES}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _offenders(graph, importer: str, banned) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if m.split(".")[0] == importer
                  for t in targets if banned(t))


def test_swarm_imports_neither_coordinator_nor_worker(graph):
    assert not _offenders(graph, "swarm", lambda t: t.split(".")[0] in ("coordinator", "worker"))


def test_coordinator_imports_no_worker(graph):
    assert not _offenders(graph, "coordinator", lambda t: t.split(".")[0] == "worker")


def test_worker_imports_only_the_protocol_of_the_coordinator(graph):
    assert not _offenders(graph, "worker", lambda t: t.split(".")[0] == "coordinator"
                          and t != "coordinator.api" and not t.startswith("coordinator.api."))


@pytest.mark.parametrize("pkg", ("model", "data_shards"))
def test_model_and_data_shards_import_nothing_above_them(graph, pkg):
    above = {"model": ("swarm", "coordinator", "worker"), "data_shards": ("model", "swarm", "coordinator", "worker")}
    assert not _offenders(graph, pkg, lambda t: t.split(".")[0] in above[pkg])


def test_no_import_circles(graph):
    """No module reaches itself through imports (package __init__ files count as modules)."""
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in graph or t == m:
                continue
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles


def test_the_checker_sees_imports_inside_functions(tmp_path, graph):
    """A guard on the checker itself: the coordinator's lazy imports (inside functions) are in the graph."""
    assert "swarm.round_checkpoint" in graph["coordinator.swarm_driver"]


def test_a_project_with_a_swarm_section_loads_without_torch(tmp_path):
    project = tmp_path / "project.yaml"
    project.write_text("run: r\nstate_dir: state\nswarm: {inner_steps: 3, rounds: 2}\n")
    code = ("import sys\nfrom coordinator.config import load_project\nfrom coordinator.swarm_plan import Plan, "
            "round_payloads\nfrom coordinator.validators import validator_for\n"
            f"cfg = load_project({str(project)!r})\n"
            "p = round_payloads(cfg.swarm, 'r', 0, 'r/round_000000', Plan({'a': [0, 1]}, {0: 1, 1: 1}, []), 2)\n"
            "validator_for('train').check_payload(p[0])\n"
            "print('torch' in sys.modules, 'hivemind' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr

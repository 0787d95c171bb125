"""model/ and data_shards/ stay pure: no hivemind, gRPC, SQLAlchemy or prometheus (STYLE.md rule 1).

Checked twice: statically (every import statement in the source) and dynamically (importing every
module must not pull those packages in through a side door)."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

BANNED = ("hivemind", "grpc", "sqlalchemy", "prometheus_client", "worker", "coordinator")
PURE = ("model", "data_shards")


def _modules(pkg):
    return sorted((REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("pkg", PURE)
def test_no_banned_import_statements(pkg):
    offenders = []
    for path in _modules(pkg):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in BANNED]
    assert not offenders, offenders


def test_importing_pure_packages_loads_no_banned_module():
    mods = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for pkg in PURE for p in _modules(pkg)]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {BANNED!r})\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

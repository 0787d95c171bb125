"""Regenerate the committed protocol modules from mujina.proto.

    python -m coordinator.api.generate            # rewrites coordinator/api/mujina_pb2*.py(i)
    python -m coordinator.api.generate --out DIR  # writes them to DIR instead (the staleness test)

grpcio-tools is pinned exactly in pyproject.toml, so a regeneration in CI is byte-identical to the
committed files; tests/coordinator/test_proto.py fails when they are stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("mujina_pb2.py", "mujina_pb2.pyi", "mujina_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency only; the server never imports it

    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", str(HERE / "mujina.proto")])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {HERE / 'mujina.proto'}")
    # protoc writes `import mujina_pb2 as ...`, which only works with this directory on sys.path;
    # the package-relative form works wherever the package is installed.
    grpc_py = out / "mujina_pb2_grpc.py"
    text = re.sub(r"^import mujina_pb2 as", "from . import mujina_pb2 as", grpc_py.read_text(), flags=re.M)
    grpc_py.write_text(text)
    return [out / name for name in OUTPUTS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="directory to write into (default: this package)")
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

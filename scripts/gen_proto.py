#!/usr/bin/env python3
"""Generate the Python gRPC code for proto/ into src/vmmigrate/ (or --out DIR).

One command: ``python scripts/gen_proto.py``. tests/unit/test_proto_stubs.py regenerates
into a temporary directory and fails if the checked-in stubs differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # imported here: only the generator needs grpcio-tools

    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside python
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(PROTO_DIR)) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with status {rc}")
    # protoc does not create package markers; the generated tree is a normal package.
    generated = []
    for pkg_dir in {p.parent for p in out.rglob("*_pb2.py")}:
        d = pkg_dir
        while d != out:
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
            d = d.parent
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".pyi"):
            generated.append(p)
    return generated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "src")
    a = ap.parse_args()
    for p in generate(a.out):
        print(p.relative_to(a.out), file=sys.stderr)


if __name__ == "__main__":
    main()

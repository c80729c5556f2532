"""The checked-in generated code matches proto/ (regenerated with the pinned grpcio-tools)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = gen
    spec.loader.exec_module(gen)
    generated = gen.generate(tmp_path)
    assert generated, "protoc produced nothing"
    checked_in = ROOT / "src"
    stale = []
    for path in generated:
        rel = path.relative_to(tmp_path)
        target = checked_in / rel
        if not target.exists() or target.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    assert not stale, f"stale generated code, run scripts/gen_proto.py: {stale}"
    # and nothing generated is checked in without a source
    ours = {p.relative_to(checked_in) for p in (checked_in / "vmmigrate").rglob("*.py*")}
    theirs = {p.relative_to(tmp_path) for p in generated}
    assert ours <= theirs | {Path("vmmigrate/py.typed")}, ours - theirs

"""The committed generated code must be exactly what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_proto_sources(tmp_path: Path) -> None:
    generator = _load_generator()
    fresh = generator.generate(tmp_path)  # type: ignore[attr-defined]
    assert fresh, "the generator produced nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = ROOT / relative
        assert committed.exists(), f"{relative} is generated but not committed: run scripts/gen_proto.py"
        assert committed.read_text() == path.read_text(), (
            f"{relative} has drifted from proto/: run `python scripts/gen_proto.py` and commit the result"
        )
    committed_files = {p.relative_to(ROOT) for p in (ROOT / "fleetctl" / "fleet" / "v1").glob("*_pb2*.py*")}
    assert committed_files == {p.relative_to(tmp_path) for p in fresh}, "stale generated files in fleet/v1"

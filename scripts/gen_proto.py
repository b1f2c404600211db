"""Regenerate fleet/v1/*_pb2*.py from proto/ — the one way generated code is made.

    python scripts/gen_proto.py            # write into fleet/v1/
    python scripts/gen_proto.py --out DIR  # write elsewhere (the drift test does this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    args = ["grpc_tools.protoc", f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}",
            f"--mypy_out={out}", f"--mypy_grpc_out={out}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {sources}")
    package_dirs = {out / Path(source).parent for source in sources}
    for package_dir in package_dirs:
        (package_dir / "__init__.py").touch()
    return sorted(p for d in package_dirs for p in d.glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()

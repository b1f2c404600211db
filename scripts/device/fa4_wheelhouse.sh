#!/usr/bin/env bash
# Build a wheelhouse of flash-attn-4 and its dependency closure for a GPU node that has
# torch already (cp312, manylinux x86_64, torch 2.11.0+cu130) and no network, then split
# it into parts small enough for the device tool's 64 MiB carry limit.
#
#   scripts/device/fa4_wheelhouse.sh [DIR]        # default DIR: .fa4wheels (git-ignored)
#
# torch itself is left out on purpose: the node's torch is used (install with
# --system-site-packages or into a --target dir on top of it).  pip must still see a torch
# that satisfies flash-attn-4's requirement, so a stub torch wheel (no files, no deps) is
# offered through --find-links and dropped afterwards.
#
# Output: DIR/*.whl, DIR/SHA256SUMS, and DIR/parts/part-NN/ (each < PART_MB MiB; wheels
# bigger than that are split with `split` into NAME.whl.part-XX, reassembled with cat).
# On the node:  cat */NAME.whl.part-* > NAME.whl; sha256sum -c SHA256SUMS;
#               pip install --no-index --find-links DIR 'flash-attn-4[cu13]==4.0.0b36'
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:-$ROOT/.fa4wheels}"
VERSION="${FA4_VERSION:-4.0.0b36}"
EXTRA="${FA4_EXTRA:-cu13}"
TORCH="${FA4_TORCH:-2.11.0+cu130}"
PART_MB="${PART_MB:-55}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

STUB="$(mktemp -d)"
trap 'rm -rf "$STUB"' EXIT
rm -rf "$DIR"
mkdir -p "$DIR"
(cd "$ROOT" && "$PY" -c "
import sys
from pathlib import Path
from tests.integration.harness.wheels import build_wheel
build_wheel(Path(sys.argv[1]), dist='torch', version=sys.argv[2], package='torch', requires=())
" "$STUB" "$TORCH")

# No --pre: only the pinned flash-attn-4 pre-release is allowed, its dependencies stay on releases.
"$PY" -m pip download -q -d "$DIR" --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform linux_x86_64 --find-links "$STUB" "flash-attn-4[$EXTRA]==$VERSION" "torch==$TORCH"
rm -f "$DIR"/torch-*.whl

(cd "$DIR" && sha256sum -- *.whl > SHA256SUMS)

# Pack into parts: whole wheels first-fit, big wheels split into pieces.
"$PY" - "$DIR" "$PART_MB" <<'PY'
import os, sys
from pathlib import Path

d, limit = Path(sys.argv[1]), int(sys.argv[2]) << 20
pieces: list[tuple[str, bytes | Path, int]] = []
for whl in sorted(d.glob("*.whl"), key=lambda p: -p.stat().st_size):
    size = whl.stat().st_size
    if size <= limit:
        pieces.append((whl.name, whl, size))
        continue
    data = whl.read_bytes()
    for i in range(0, size, limit):
        pieces.append((f"{whl.name}.part-{i // limit:02d}", data[i:i + limit], min(limit, size - i)))
parts: list[list[tuple[str, bytes | Path, int]]] = []
for piece in pieces:
    for part in parts:
        if sum(p[2] for p in part) + piece[2] <= limit:
            part.append(piece)
            break
    else:
        parts.append([piece])
for n, part in enumerate(parts, 1):
    out = d / "parts" / f"part-{n:02d}"
    out.mkdir(parents=True)
    for name, src, _ in part:
        target = out / name
        if isinstance(src, Path):
            os.link(src, target)
        else:
            target.write_bytes(src)
    print(f"{out}: {sum(p[2] for p in part) / 2**20:.1f} MiB, {len(part)} file(s)")
PY
cp "$DIR/SHA256SUMS" "$DIR/parts/part-01/"
ls -la "$DIR"

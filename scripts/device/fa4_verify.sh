#!/usr/bin/env bash
# On a GPU node with torch and no network: install flash-attn-4 from the wheelhouse that
# scripts/device/fa4_wheelhouse.sh made (its parts carried under PARTS), then run the verification
# benchmark with FA4 as the only FlashAttention, full mode first (it compiles FA4's kernels into the
# on-disk CuTe DSL cache), then quick mode (which then reuses them).
#
#   PYTHON=/opt/torch/.venv/bin/python3 PARTS=/root/fa4 OUT=/tmp/out scripts/device/fa4_verify.sh
#
# The package goes into PYTHON's own environment (the device machine is disposable; a venv made from a
# venv's python with --system-site-packages would not see that venv's torch).  FULL_TIMEOUT and
# QUICK_TIMEOUT bound the two runs (bench.py's --timeout); the end-to-end check is skipped (SKIP_E2E=0
# keeps it).  Writes to $OUT: env.txt, install.txt, verify-full.json, verify-quick.json and their tables.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
PARTS="${PARTS:-/root/fa4}"
OUT="${OUT:-$ROOT/out}"
FULL_TIMEOUT="${FULL_TIMEOUT:-270}"
QUICK_TIMEOUT="${QUICK_TIMEOUT:-90}"
BENCH="$ROOT/fleetctl/agent/verify/bench.py"
mkdir -p "$OUT"
WHEELS="$PARTS/wheels"

{
  echo "== reassemble $PARTS → $WHEELS"
  mkdir -p "$WHEELS"
  for f in "$PARTS"/part-*/*; do
    case "$f" in
      *.whl.part-*) ;;
      *) cp -f "$f" "$WHEELS/" ;;
    esac
  done
  for first in "$PARTS"/part-*/*.whl.part-00; do
    [[ -e "$first" ]] || continue
    name="$(basename "${first%.part-00}")"
    for i in $(seq -w 0 99); do  # pieces in order, wherever each part put them
      piece="$(ls "$PARTS"/part-*/"$name.part-$i" 2>/dev/null)" || break
      cat "$piece"
    done > "$WHEELS/$name"
  done
  (cd "$WHEELS" && sha256sum -c SHA256SUMS) || { echo "CHECKSUM MISMATCH: a part is missing or corrupt"; exit 2; }
  echo "== install"
  t0=$(date +%s%N)
  "$PY" -m pip install --no-index --find-links "$WHEELS" 'flash-attn-4[cu13]==4.0.0b36' 2>&1 | tail -n 15
  echo "install rc=${PIPESTATUS[0]} ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
  "$PY" -m pip check 2>&1 | tail -n 5
  "$PY" -m pip list 2>/dev/null | grep -Ei 'flash|cutlass|quack|tvm|dlpack|cuda-bindings|^torch '
} > "$OUT/install.txt" 2>&1
cat "$OUT/install.txt"
grep -q "install rc=0" "$OUT/install.txt" || exit 3

{
  echo "== date"; date -u +%FT%TZ
  echo "== python"; command -v "$PY"; "$PY" -V
  echo "== nvidia-smi"; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

skip=(--skip-e2e)
[[ "${SKIP_E2E:-1}" == 0 ]] && skip=()
run() {  # name, timeout, then bench args
  local name="$1" limit="$2"; shift 2
  echo "================ $name: bench.py $*"
  local t0=$SECONDS
  timeout --kill-after=15 $((limit + 60)) "$PY" "$BENCH" --out "$OUT/$name.json" --timeout "$limit" "$@" \
    2> "$OUT/$name.stderr.txt"
  echo "(exit $?, wall $((SECONDS - t0)) s)"
  if [[ -s "$OUT/$name.json" ]]; then
    "$PY" "$BENCH" --summarize "$OUT/$name.json" > "$OUT/$name.table.txt"
    head -n 12 "$OUT/$name.table.txt"
  fi
  tail -n 3 "$OUT/$name.stderr.txt"
  rm -f "$OUT/$name.stderr.txt"  # the result keeps worker_stderr_tail when it matters
}
run verify-full "$FULL_TIMEOUT" --mode full "${skip[@]}"
run verify-quick "$QUICK_TIMEOUT" --mode quick

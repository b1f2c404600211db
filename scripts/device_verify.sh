#!/usr/bin/env bash
# Run the verification benchmark (agent/verify/bench.py) on a real GPU node.
#
#   PYTHON=/opt/torch/.venv/bin/python3 OUT=/tmp/out scripts/device_verify.sh [extra bench.py args]
#
# Writes to $OUT: verify-full.json (full mode: the result the issue asks for),
# verify-quick.json (quick mode), verify-faults.json (quick mode with injected
# faults: a hung shape, NaN outputs, a real CUDA OOM — each must come back as a
# clear per-shape result while the rest still runs), env.txt, and the printed tables.
# Needs no network and no project install: bench.py is standalone (stdlib + torch,
# flash_attn and transformers when present).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
BENCH="$ROOT/fleetctl/agent/verify/bench.py"

{
  echo "== date"; date -u +%FT%TZ
  echo "== python"; command -v "$PY"; "$PY" -V
  echo "== nvidia-smi"; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,memory.used --format=csv 2>&1
  echo "== packages"
  "$PY" - <<'PY' 2>&1
import importlib
for name in ("torch", "flash_attn", "transformers"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except BaseException as exc:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

rc_all=0
run() {  # name, then bench args
  local name="$1"; shift
  echo
  echo "================ $name: bench.py $*"
  local t0=$SECONDS
  timeout --kill-after=15 480 "$PY" "$BENCH" --out "$OUT/$name.json" "$@" 2> "$OUT/$name.stderr.txt"
  local rc=$?
  echo "(exit $rc, wall $((SECONDS - t0)) s)"
  if [[ -s "$OUT/$name.json" ]]; then
    "$PY" "$BENCH" --summarize "$OUT/$name.json" | tee "$OUT/$name.table.txt"
  else
    echo "no result file; stderr tail:"; tail -n 30 "$OUT/$name.stderr.txt"
    rc_all=1
  fi
  tail -n 5 "$OUT/$name.stderr.txt" | sed 's/^/  stderr: /'
}

run verify-full --mode full "$@"
run verify-quick --mode quick "$@"
# Fault handling on a real GPU: a hung speed shape (killed after 10 s, worker restarted),
# NaN injected into one correctness case, and a 0.5 % memory cap so the math backend
# and most shapes hit a real CUDA OOM (recorded, not fatal).
run verify-faults --mode quick --timeout-per-shape 10 \
  --inject hang:speed/sdpa_efficient/bfloat16/hd128/s1024/full \
  --inject nan:correctness/sdpa_flash/float16 \
  --inject memfrac:0.005

echo
echo "== GPU after the runs"
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv 2>&1
nvidia-smi --query-compute-apps=pid,used_memory --format=csv 2>&1
exit $rc_all

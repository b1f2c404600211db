#!/usr/bin/env bash
# Rehearse scripts/device/e2e.sh on a machine without a GPU (from the repository root):
#   scripts/device/e2e_rehearsal.sh [DIR]
# Makes a target venv with a stand-in torch and a stand-in `ninja`, the harness's stand-in flash_attn sdist
# (as flash_attn-2.8.3.post1.tar.gz), then runs every phase of e2e.sh with the agent's GPU facts from the
# h100-cu130 profile (the lent H100's real facts) and everything else real: controller, agent, gRPC,
# artifact store, ansible-runner with connection local, pip. Verification runs for real and fails
# (no GPU, stand-in torch): that is expected here. The collected tarball lands in DIR/out/e2e.tar.gz.
set -euo pipefail
REPO=$(pwd)
DIR=${1:-/tmp/e2e-rehearsal}
PY=${E2E_PY:-$REPO/.venv/bin/python}
mkdir -p "$DIR"
if [[ ! -x "$DIR/target/bin/python" ]]; then
  "$PY" -m venv "$DIR/target"
  PYTHONPATH=$REPO "$PY" - "$DIR" <<'PY'
import sys
from pathlib import Path
from tests.integration.harness.wheels import build_sdist, build_wheel
d = Path(sys.argv[1])
build_wheel(d / "wheels", dist="torch", version="2.11.0", package="torch", requires=())
build_sdist(d / "sdist", version="2.8.3.post1")
PY
  env -u PYTHONPATH "$DIR/target/bin/python" -m pip install -q --no-index --no-deps "$DIR"/wheels/torch-*.whl
  printf '#!/bin/sh\necho 1.11.1.stand-in\n' > "$DIR/target/bin/ninja"; chmod +x "$DIR/target/bin/ninja"
fi
export E2E_DIR="$DIR/run" E2E_SITE="" E2E_PY="$PY" E2E_PYTHON="$DIR/target/bin/python" \
       E2E_SDIST="$DIR/sdist/flash_attn-2.8.3.post1.tar.gz" E2E_SIMULATE=${E2E_SIMULATE:-h100-cu130} \
       E2E_HOSTNAME=${E2E_HOSTNAME:-rehearsal-h100} E2E_VERIFY_MODE=${E2E_VERIFY_MODE:-quick} OUT="$DIR/out"
export PATH="$(dirname "$PY"):$PATH"
E2E=scripts/device/e2e.sh
trap 'bash $E2E stop' EXIT
bash $E2E setup
bash $E2E start
bash $E2E status
bash $E2E wait "${E2E_WAIT:-240}"
bash $E2E second
bash $E2E collect

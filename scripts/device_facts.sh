#!/bin/sh
# Print this GPU node's facts (DESIGN §3.1) with the agent run from a source checkout.
# Run from the repository root: scripts/device_facts.sh [TARGET_PYTHON] [extra `facts` flags...]
# The project does not need to be pip-installed: PYTHONPATH gets the repo (plus anything already
# there, e.g. a /tmp/site of wheels). Probes need only the stdlib and nvidia-ml-py (`pynvml`),
# which is looked for in the agent's interpreter; the target interpreter (default
# /opt/torch/.venv/bin/python3) is only run, never imported from.
set -eu
cd "$(dirname "$0")/.."
TARGET=${1:-${FLEET_TARGET_PYTHON:-/opt/torch/.venv/bin/python3}}
[ "$#" -gt 0 ] && shift
# The agent's interpreter: prefer the target venv's python (it has nvidia-ml-py there), else python3.
AGENT_PY=${FLEET_AGENT_PYTHON:-}
if [ -z "$AGENT_PY" ]; then
    if "$TARGET" -c 'import pynvml' 2>/dev/null; then AGENT_PY=$TARGET; else AGENT_PY=python3; fi
fi
PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" exec "$AGENT_PY" -m fleetctl.agent.main facts --json --python "$TARGET" "$@"

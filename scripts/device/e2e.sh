#!/usr/bin/env bash
# Issue 8 end to end on the lent H100 (no network), one phase per call, from the repository root:
#   e2e.sh setup     — install the carried wheels (.whl/*.whl) into /tmp/site; preflight every import and tool
#   e2e.sh start     — controller (detached) + sdist into its artifact store + real agent (detached);
#                      plan / dry-run; rollout #1 started detached (fa2-source: build → upload → install → full verify)
#   e2e.sh status    — rollout status, the current job's last events, build processes
#   e2e.sh wait S    — wait up to S seconds for rollout #1 to end (safe to repeat)
#   e2e.sh second    — pip uninstall flash-attn, agent re-reports facts, rollout #2 in the foreground (must be
#                      fa2-wheel with the wheel rollout #1 built; refuses to start a second build)
#   e2e.sh collect   — $OUT/e2e.tar.gz: the fixtures layout of tests/fixtures/h100_e2e/ + DB copy, logs, timings
#   e2e.sh drive S   — wait ≤ S s; if rollout #1 has ended, `second`; then `collect` either way (a machine that
#                      goes back after 30 min held still ends the call in flight: the last call finishes the run)
#   e2e.sh stop      — stop the agent and the controller this script started
# Everything lives under $E2E_DIR (default /tmp/e2e). The rehearsal on a machine without a GPU sets
# E2E_SIMULATE=h100-cu130 (GPU facts from that profile, playbooks for real), E2E_PYTHON, E2E_SDIST, E2E_PY,
# E2E_SITE="" (tests/integration/e2e/test_rehearsal.py). See docs/gpu-e2e.md.
set -uo pipefail
PHASE=${1:?phase: setup|start|status|wait S|second|collect|stop}
REPO=$(pwd)
E2E=$(realpath -m "${E2E_DIR:-/tmp/e2e}")        # absolute: the daemons run from $E2E/run
SITE=${E2E_SITE-/tmp/site}
PY=${E2E_PY:-python3}                                   # runs controller, agent and fleetctl
TARGET_PY=${E2E_PYTHON:-/opt/torch/.venv/bin/python3}   # the node's target environment (torch)
# absolute, symlinks kept (a venv's python must stay the venv's): the daemons do not run from the checkout
[[ "$PY" == */* ]] && PY=$(realpath -s -m "$PY")
[[ "$TARGET_PY" == */* ]] && TARGET_PY=$(realpath -s -m "$TARGET_PY")
VERSION=${E2E_VERSION:-2.8.3.post1}
SIMULATE=${E2E_SIMULATE:-}
HTTP_PORT=${E2E_HTTP_PORT:-17480}
GRPC_PORT=${E2E_GRPC_PORT:-17443}
ENROLL_PORT=$((GRPC_PORT + 1))
BUILD_TIMEOUT=${E2E_BUILD_TIMEOUT:-5400}   # the build step's deadline: 90 min (the build took 1333-1403 s)
VERIFY_MODE=${E2E_VERIFY_MODE:-full}

export LC_ALL=C.UTF-8 LANG=C.UTF-8     # Ansible refuses a non-UTF-8 locale
export PYTHONPATH="$REPO${SITE:+:$SITE}"
[[ -n "$SITE" ]] && export PATH="$SITE/bin:$PATH"
export FLEETCTL_STATE_DIR="$E2E/controller"
export ANSIBLE_LOCAL_TEMP="$E2E/ansible-tmp" ANSIBLE_REMOTE_TEMP="$E2E/ansible-tmp"
mkdir -p "$E2E/logs" "$E2E/ansible-tmp" "$E2E/run"

fleetctl() { "$PY" -m fleetctl.controller.cli "$@"; }
now() { date +%s; }
jq_py() {  # jq_py EXPR < json: evaluate a Python expression on `d` (the parsed JSON)
  "$PY" -c "import json,sys; d=json.load(sys.stdin); v=($1); print(v if not isinstance(v,(dict,list)) else json.dumps(v))"
}
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
sdist() { if [[ -n "${E2E_SDIST:-}" ]]; then echo "$E2E_SDIST"; else ls "$REPO"/.device/sdist/flash_attn-*.tar.gz | head -1; fi; }
host() { cat "$E2E/hostname" 2>/dev/null || fleetctl nodes --json | jq_py 'd["nodes"][0]["hostname"]'; }
mark() { echo "$1=$(now)" >> "$E2E/times"; }  # timing marks, read by collect

start_agent() {
  local args=(run --controller "127.0.0.1:$GRPC_PORT" --ca "$E2E/controller/ca/ca.pem" --state-dir "$E2E/agent"
              --python "$TARGET_PY" --executor ansible --node-state-dir "$E2E/node")
  [[ -n "$SIMULATE" ]] && args+=(--simulate "$SIMULATE" --hostname "${E2E_HOSTNAME:-rehearsal-h100}")
  [[ -n "${1:-}" ]] && args+=(--token "$1")
  # cwd $E2E/run, not the checkout: each device call re-sends the working tree, and a daemon (or the playbook
  # it starts) whose working directory was replaced under it fails on os.getcwd() (docs/gpu-e2e.md, 2026-11-25)
  (cd "$E2E/run" && exec setsid nohup "$PY" -m fleetctl.agent.main "${args[@]}" >> "$E2E/logs/agent.log" 2>&1 < /dev/null) &
  echo $! > "$E2E/agent.pid"
}

wait_online() {  # wait_online SECONDS [jq condition on the node]
  local cond=${2:-True}
  for _ in $(seq 1 "$1"); do
    local ok
    ok=$(fleetctl nodes --json --facts 2>/dev/null | jq_py "any(n['status'] in ('online', 'degraded') and ($cond) for n in d['nodes'])")
    [[ "$ok" == True ]] && return 0
    sleep 1
  done
  return 1
}

rollout_done() {  # rollout_done ID → prints status, rc 0 when no longer active
  fleetctl rollout status "$1" --json > "$E2E/.st.json" 2>/dev/null || return 1
  jq_py 'd["status"]' < "$E2E/.st.json"
  [[ "$(jq_py 'd["active"]' < "$E2E/.st.json")" == False ]]
}

case "$PHASE" in
  setup)
    if [[ -n "$SITE" ]]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || exit 1
    fi
    echo "== preflight ($PY, PYTHONPATH=$PYTHONPATH)"
    fail=0
    "$PY" - <<'PY' || fail=1
import importlib, sys
mods = ["grpc", "google.protobuf", "sqlalchemy", "alembic", "fastapi", "starlette", "uvicorn", "pydantic", "httpx",
        "jinja2", "yaml", "packaging", "cryptography", "croniter", "multipart", "prometheus_client",
        "ansible", "ansible_runner", "pexpect", "daemon", "lockfile", "resolvelib", "pynvml", "annotated_doc",
        "opentelemetry", "dateutil", "click", "h11", "anyio", "markupsafe", "typing_extensions",
        "fleetctl.controller.app", "fleetctl.controller.cli", "fleetctl.controller.web", "fleetctl.agent.main", "fleetctl.agent.executor", "fleetctl.agent.artifact_jobs"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001
        bad.append(f"{m}: {type(exc).__name__}: {exc}")
print(sys.version.split()[0], sys.executable)
print("\n".join("MISSING " + b for b in bad) or "all imports ok")
sys.exit(1 if bad else 0)
PY
    command -v ansible-playbook || { echo "MISSING ansible-playbook on PATH"; fail=1; }
    if AV=$(ansible-playbook --version 2>&1); then echo "${AV%%$'\n'*}"; else echo "$AV"; fail=1; fi
    if [[ -x /usr/bin/python3 ]]; then /usr/bin/python3 -V; else echo "no /usr/bin/python3: modules use $PY"; fi
    "$TARGET_PY" -c "import torch, sys; print('target', sys.version.split()[0], torch.__version__, torch.version.cuda)" \
      || { echo "target python $TARGET_PY cannot import torch"; [[ -z "$SIMULATE" ]] && fail=1; }
    "$TARGET_PY" -c "import setuptools, wheel, packaging; print('build deps ok')" 2>&1 | tail -1
    env -u PYTHONPATH "$TARGET_PY" -c "import os, sysconfig; p = sysconfig.get_paths()['purelib']; print('target site-packages', p, 'writable' if os.access(p, os.W_OK) else 'NOT WRITABLE')"
    env -u PYTHONPATH "$TARGET_PY" -m pip --version
    PATH="$(dirname "$TARGET_PY"):$PATH" command -v ninja || echo "WARNING: no ninja next to the target python or on PATH (the playbook would try apt: no network)"
    command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || echo "no nvcc (fine only for a rehearsal)"
    echo "sdist: $(sdist) ($(stat -c %s "$(sdist)" 2>/dev/null) bytes)"
    nproc; free -g | head -2; df -h /tmp | tail -1
    [[ $fail == 0 ]] && echo "SETUP OK" || { echo "SETUP FAILED"; exit 1; }
    ;;

  start)
    if alive "$E2E/controller.pid"; then echo "controller already running (pid $(cat "$E2E/controller.pid"))"
    else
      mark controller_start
      (cd "$E2E/run" && exec setsid nohup "$PY" -m fleetctl.controller.main serve --state-dir "$E2E/controller" \
        --grpc-listen "127.0.0.1:$GRPC_PORT" --enroll-listen "127.0.0.1:$ENROLL_PORT" \
        --http-listen "127.0.0.1:$HTTP_PORT" >> "$E2E/logs/controller.log" 2>&1 < /dev/null) &
      echo $! > "$E2E/controller.pid"
      for _ in $(seq 1 60); do fleetctl artifact list >/dev/null 2>&1 && break; sleep 1; done
      fleetctl artifact list >/dev/null || { echo "controller did not come up"; tail -30 "$E2E/logs/controller.log"; exit 1; }
    fi
    SD=$(sdist)
    if [[ "$(fleetctl artifact list --json | jq_py "any(a['filename']=='flash_attn-$VERSION.tar.gz' for a in d['artifacts'])")" != True ]]; then
      fleetctl artifact add "$SD" --kind sdist --name "flash_attn-$VERSION.tar.gz" || exit 1
    fi
    fleetctl artifact list
    if alive "$E2E/agent.pid"; then echo "agent already running (pid $(cat "$E2E/agent.pid"))"
    else
      if [[ -f "$E2E/agent/identity.json" ]]; then start_agent
      else start_agent "$(fleetctl token create --ttl 1h --json | jq_py 'd["token"]')"; fi
    fi
    wait_online 120 || { echo "agent did not come online"; tail -40 "$E2E/logs/agent.log"; exit 1; }
    mark agent_online
    H=$(host); echo "$H" > "$E2E/hostname"
    fleetctl nodes; fleetctl node "$H"
    fleetctl node "$H" --json | jq_py 'd["facts"]' > "$E2E/facts-before.json"
    if [[ -f "$E2E/rollout1.id" ]]; then echo "rollout #1 already started: $(cat "$E2E/rollout1.id")"; exit 0; fi
    fleetctl rollout flash-attn --version "$VERSION" --nodes "$H" --canary 0 --batch 1 --dry-run | tee "$E2E/plan1.txt"
    fleetctl rollout flash-attn --version "$VERSION" --nodes "$H" --canary 0 --batch 1 --dry-run --json > "$E2E/plan1.json"
    echo "plan: $(jq_py '[(n["variant"], n["steps"], (n["decision"].get("build") or {}).get("env")) for n in d["nodes"]]' < "$E2E/plan1.json")"
    mark rollout1_start
    fleetctl rollout flash-attn --version "$VERSION" --nodes "$H" --canary 0 --batch 1 --max-failures 1 \
      --verify-mode "$VERIFY_MODE" --step-timeout "build-from-source=$BUILD_TIMEOUT,verify=1500,install-wheel=900" \
      --detach --json > "$E2E/rollout1.start.json" || { cat "$E2E/rollout1.start.json"; exit 1; }
    jq_py 'd["id"]' < "$E2E/rollout1.start.json" > "$E2E/rollout1.id"
    echo "rollout #1 $(cat "$E2E/rollout1.id") started at $(date -u +%FT%TZ); follow: e2e.sh status / e2e.sh wait S"
    ;;

  status)
    RID=$(cat "$E2E/rollout1.id" 2>/dev/null) || { echo "no rollout started"; exit 1; }
    [[ -f "$E2E/rollout2.id" ]] && RID=$(cat "$E2E/rollout2.id")
    fleetctl rollout status "$RID"
    JOB=$(fleetctl rollout status "$RID" --json | jq_py '[n.get("job_id") for n in d["nodes"]][0] or ""')
    if [[ -n "$JOB" && "$JOB" != "None" ]]; then fleetctl job "$JOB" | tail -8; fi
    echo "build processes: $(pgrep -c -f 'nvcc|cicc|ptxas' 2>/dev/null || echo 0); agent $(alive "$E2E/agent.pid" && echo up || echo DOWN), controller $(alive "$E2E/controller.pid" && echo up || echo DOWN)"
    alive "$E2E/agent.pid" && echo "agent cwd: $(readlink "/proc/$(cat "$E2E/agent.pid")/cwd")"
    tail -3 "$E2E/logs/agent.log"
    ;;

  wait)
    RID=$(cat "$E2E/rollout1.id") || exit 1
    # a wall-clock deadline: each poll runs fleetctl (~1-2 s), so counting polls overran a 600 s device call
    deadline=$(( $(now) + ${2:-540} ))
    while (( $(now) < deadline )); do
      if rollout_done "$RID" > /dev/null; then break; fi
      sleep 5
    done
    if rollout_done "$RID"; then
      grep -q '^rollout1_end=' "$E2E/times" 2>/dev/null || mark rollout1_end
      fleetctl rollout status "$RID"
    else
      echo "still running"; bash "$0" status
    fi
    ;;

  second)
    RID1=$(cat "$E2E/rollout1.id") || exit 1
    rollout_done "$RID1" > /dev/null || { echo "rollout #1 still running"; exit 1; }
    H=$(cat "$E2E/hostname")
    if [[ ! -f "$E2E/rollout2.id" ]]; then
      mark uninstall_start
      env -u PYTHONPATH "$TARGET_PY" -m pip uninstall -y flash-attn || true
      env -u PYTHONPATH "$TARGET_PY" -c "import flash_attn" 2>/dev/null && { echo "flash_attn still importable"; exit 1; }
      # the agent reports facts when its session starts: restart it (same identity, no token)
      if alive "$E2E/agent.pid"; then kill "$(cat "$E2E/agent.pid")"; for _ in $(seq 1 30); do alive "$E2E/agent.pid" || break; sleep 1; done; fi
      start_agent
      wait_online 120 "n['hostname']=='$H' and not (n.get('facts') or {}).get('flash_attn')" \
        || { echo "node did not come back without flash-attn"; fleetctl node "$H"; exit 1; }
      mark facts_refreshed
      fleetctl rollout flash-attn --version "$VERSION" --nodes "$H" --canary 0 --batch 1 --dry-run | tee "$E2E/plan2.txt"
      fleetctl rollout flash-attn --version "$VERSION" --nodes "$H" --canary 0 --batch 1 --dry-run --json > "$E2E/plan2.json"
      V=$(jq_py 'd["nodes"][0]["variant"]' < "$E2E/plan2.json")
      if [[ "$V" != "fa2-wheel" ]]; then
        echo "REFUSING rollout #2: the plan is $V, not fa2-wheel with the wheel rollout #1 built"; exit 1
      fi
      mark rollout2_start
      T0=$(date +%s.%N)
      fleetctl rollout flash-attn --version "$VERSION" --nodes "$H" --canary 0 --batch 1 --max-failures 1 \
        --step-timeout install-wheel=300,verify=600 --wait-timeout 600 | tee "$E2E/rollout2.txt"
      T1=$(date +%s.%N)
      mark rollout2_end
      fleetctl rollout list --json | jq_py 'd["rollouts"][0]["id"] if isinstance(d, dict) else d[0]["id"]' > "$E2E/rollout2.id"
      "$PY" -c "print('rollout #2 wall seconds: %.1f' % ($T1 - $T0))" | tee "$E2E/rollout2.seconds"
    fi
    fleetctl rollout status "$(cat "$E2E/rollout2.id")"
    ;;

  collect)
    OUTDIR=${OUT:-$E2E/out}
    C="$E2E/collect"; rm -rf "$C"; mkdir -p "$C/h100_e2e/jobs" "$C/extra"
    H=$(cat "$E2E/hostname")
    F="$C/h100_e2e"
    for n in 1 2; do
      [[ -f "$E2E/rollout$n.id" ]] || continue
      fleetctl rollout status "$(cat "$E2E/rollout$n.id")" --json > "$C/extra/rollout${n}_status.json"
    done
    cp "$C/extra/rollout1_status.json" "$F/rollout_status.json" 2>/dev/null
    cp "$C/extra/rollout2_status.json" "$F/rollout2_status.json" 2>/dev/null
    fleetctl node "$H" --json > "$F/node.json"
    jq_py 'd["facts"]' < "$F/node.json" > "$F/facts.json"
    for j in $("$PY" -c "from fleetctl.controller.client import ControllerClient as C
print(' '.join(j['id'] for j in C.discover().get('/jobs', node='$H', limit=1000)['jobs']))"); do
      fleetctl job "$j" --json > "$F/jobs/$j.json"
    done
    "$PY" - "$F" <<'PY'
import json, pathlib, sys
F = pathlib.Path(sys.argv[1])
jobs = [json.loads(p.read_text()) for p in sorted(F.glob("jobs/*.json"))]
ver = [j for j in jobs if j.get("kind") == "verify" and isinstance((j.get("result") or {}).get("verification"), dict)]
ver.sort(key=lambda j: j.get("created_at") or "")
if ver:  # rollout #1's verification (the full one) is the first
    (F / "verification.json").write_text(json.dumps(ver[0]["result"]["verification"], indent=2) + "\n")
    if len(ver) > 1:
        (F / "verification2.json").write_text(json.dumps(ver[-1]["result"]["verification"], indent=2) + "\n")
PY
    # the device's copy of .git can lag the tree that travelled: pass E2E_COMMIT=<commit> from here
    "$PY" - "$F" "${E2E_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" <<'PY'
import datetime as dt, json, pathlib, socket, sys
F = pathlib.Path(sys.argv[1])
node = json.loads((F / "node.json").read_text())
meta = {"simulated": bool(node.get("simulated")), "rehearsal": bool((node.get("extra") or {}).get("rehearsal")),
        "hostname": node.get("hostname"), "machine": socket.gethostname(), "commit": sys.argv[2] or None,
        "collected_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "what": "scripts/device/e2e.sh collect: issue 8 end to end (docs/gpu-e2e.md)"}
(F / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
PY
    "$PY" - "$E2E/controller/controller.db" "$C/extra/controller.db" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst); dst.close(); src.close()
PY
    fleetctl rollout list > "$C/extra/rollouts.txt" 2>&1
    fleetctl artifact list --json > "$C/extra/artifacts.json" 2>&1
    cp "$E2E"/plan*.json "$E2E"/plan*.txt "$E2E"/rollout2.txt "$E2E"/facts-before.json "$E2E/times" "$C/extra/" 2>/dev/null
    tail -c 2000000 "$E2E/logs/controller.log" > "$C/extra/controller.log"
    tail -c 2000000 "$E2E/logs/agent.log" > "$C/extra/agent.log"
    "$PY" - "$E2E" "$F" > "$C/timing.txt" <<'PY'
import datetime as dt, json, pathlib, sys
E, F = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
marks = dict(l.split("=", 1) for l in (E / "times").read_text().split() if "=" in l) if (E / "times").exists() else {}
def span(a, b):
    return f"{int(marks[b]) - int(marks[a])} s" if a in marks and b in marks else "?"
print("timing summary (wall clock, from the controller's job records and this script's marks)")
print(f"controller start → agent online: {span('controller_start', 'agent_online')}")
print(f"rollout #1 (start → end seen by `wait`): {span('rollout1_start', 'rollout1_end')}")
print(f"uninstall → fresh facts: {span('uninstall_start', 'facts_refreshed')}")
if (E / "rollout2.seconds").exists():
    print((E / "rollout2.seconds").read_text().strip())
def t(x):
    return dt.datetime.fromisoformat(x) if x else None
for p in sorted(F.glob("jobs/*.json"), key=lambda p: json.loads(p.read_text()).get("created_at") or ""):
    j = json.loads(p.read_text())
    a, b, c = t(j.get("created_at")), t(j.get("dispatched_at")), t(j.get("finished_at"))
    dur = f"{(c - (b or a)).total_seconds():8.1f} s" if c and (b or a) else "       ?  "
    extra = ""
    for e in j.get("events") or []:
        if e.get("event") in ("fleet_artifact_fetch", "fleet_artifact_upload"):
            d = e.get("data") or {}
            extra += f"  {e['event'][15:]} {d.get('file')} {d.get('bytes')} B in {d.get('seconds', 'cached')} s"
    print(f"{j.get('kind', '?'):<18} {j.get('status', '?'):<10} {dur}  job {j.get('id')}{extra}")
PY
    cat "$C/timing.txt"
    mkdir -p "$OUTDIR"
    tar -C "$C" -czf "$OUTDIR/e2e.tar.gz" . && ls -la "$OUTDIR/e2e.tar.gz"
    ;;

  drive)  # one device call late in the lease: wait ≤ S s; once rollout #1 has ended, rollout #2; always collect
    bash "$0" wait "${2:-420}"
    rollout_done "$(cat "$E2E/rollout1.id")" > /dev/null && bash "$0" second
    bash "$0" collect
    ;;

  stop)
    for p in agent controller; do
      if alive "$E2E/$p.pid"; then kill "$(cat "$E2E/$p.pid")"; echo "stopped $p"; fi
    done
    ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac

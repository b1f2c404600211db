#!/usr/bin/env bash
# Issue 12 on the lent H200 (no network): `fleetctl rollout flash-attn --fa4` through the real path —
# controller started --offline with flash-attn-4 and its dependency closure put in its artifact store,
# a real agent (--executor ansible) installing into the node's torch environment, real verification,
# rollback, and the rollout again. From the repository root:
#
#   e2e_fa4.sh stash DIR…   copy carried folders into $STASH (default /root/stash): one call per part, as the
#                           device takes at most 64 MiB a call (scripts/device/fa4_wheelhouse.sh splits them)
#   e2e_fa4.sh run          everything below, then `collect`; prints a timing summary
#   e2e_fa4.sh attention    issue 16: a full verification of what the node has (SDPA backends, e2e), plans
#                           `--prefer fastest` per workload, rollout `--prefer fastest --workload prefill` (FA4
#                           from the store) with a full verification of every implementation, the report after;
#                           then `collect`
#   e2e_fa4.sh attention-fa2  issue 16 with FA2 in the same verification: the store also holds the trimmed FA2
#                           sdist (scripts/device/fa2_trim.py, $STASH/fa2/ or E2E_FA2_SDIST) under the name the
#                           resolver plans for; rollout #1 `--version 2.8.3` (fa2-source: build on the node →
#                           upload → install, quick verification), rollout #2 `--fa4` (FA4 installed beside it:
#                           FA4 ships only flash_attn/cute, FA2's flash_attn stays) with a full verification that
#                           measures FA2, FA4 and every SDPA backend in one run; plans and report after; `collect`
#   e2e_fa4.sh collect      $OUT/e2e_fa4.tar.gz: statuses, jobs with events, facts, verification, timings, DB
#
# Steps of `run`: project wheels from $STASH/whl*/ (carried as .whl, .whl-a) into $SITE (the device's grpcio is
# too old); FA4 wheels
# reassembled from $STASH/part-* and checked against SHA256SUMS; controller --offline; each wheel
# `fleetctl artifact add`-ed (an air-gapped site would `fleetctl bundle import`); agent enrolled; dry run (the
# preflight must show nothing missing); rollout #1 --fa4 (install-wheel with the closure + verify);
# rollback (flash-attn-4 removed, node not degraded); rollout #3 --fa4 again (idempotent, from the store).
# Rehearsal without a GPU: E2E_SIMULATE=PROFILE, E2E_PYTHON=venv python with a stand-in torch,
# E2E_FA4_WHEELS=DIR of stand-in wheels, E2E_SITE="" (tests/integration/e2e/test_rehearsal_fa4.py).
set -uo pipefail
PHASE=${1:?phase: stash DIR…|run|attention|attention-fa2|collect}
shift
REPO=$(pwd)
E2E=$(realpath -m "${E2E_DIR:-/tmp/e2e-fa4}")
STASH=${STASH:-/root/stash}
SITE=${E2E_SITE-/tmp/site}
PY=${E2E_PY:-python3}
TARGET_PY=${E2E_PYTHON:-/opt/torch/.venv/bin/python3}
[[ "$PY" == */* ]] && PY=$(realpath -s -m "$PY")
[[ "$TARGET_PY" == */* ]] && TARGET_PY=$(realpath -s -m "$TARGET_PY")
SIMULATE=${E2E_SIMULATE:-}
HTTP_PORT=${E2E_HTTP_PORT:-17480}
GRPC_PORT=${E2E_GRPC_PORT:-17443}
VERIFY_MODE=${E2E_VERIFY_MODE:-quick}
WAIT=${E2E_WAIT:-420}
FA2_VERSION=${E2E_FA2_VERSION:-2.8.3}  # the release the trimmed sdist was made from: the store name the plan looks up

export LC_ALL=C.UTF-8 LANG=C.UTF-8
export PYTHONPATH="$REPO${SITE:+:$SITE}"
[[ -n "$SITE" ]] && export PATH="$SITE/bin:$PATH"
export FLEETCTL_STATE_DIR="$E2E/controller"
fleetctl() { "$PY" -m fleetctl.controller.cli "$@"; }
now() { date +%s.%N; }
mark() { echo "$1=$(now)" >> "$E2E/times"; }
jq_py() { "$PY" -c "import json,sys; d=json.load(sys.stdin); v=($1); print(v if not isinstance(v,(dict,list)) else json.dumps(v))"; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

rollout() {  # rollout N ARGS…: start, follow to the end, keep its status JSON; prints its status
  local n=$1; shift
  mark "rollout${n}_start"
  fleetctl rollout "$@" --wait-timeout "$WAIT" > "$E2E/rollout$n.txt" 2>&1
  echo "rc=$?" >> "$E2E/rollout$n.txt"
  mark "rollout${n}_end"
  fleetctl rollout status --json > "$E2E/rollout$n.json"
  tail -4 "$E2E/rollout$n.txt"
  jq_py 'd["status"]' < "$E2E/rollout$n.json"
}

installed() {  # what the target env has now (versions, pip check) → $E2E/venv-$1.txt
  env -u PYTHONPATH "$TARGET_PY" - > "$E2E/venv-$1.txt" 2>&1 <<'PY'
from importlib import metadata
for d in ("flash-attn-4", "flash-attn", "nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi", "einops", "torch"):
    try:
        print(f"{d}=={metadata.version(d)}")
    except metadata.PackageNotFoundError:
        print(f"{d} absent")
PY
  env -u PYTHONPATH "$TARGET_PY" -m pip check >> "$E2E/venv-$1.txt" 2>&1
  echo "pip check rc=$?" >> "$E2E/venv-$1.txt"
  echo "-- target env $1:"; cat "$E2E/venv-$1.txt"
}

attention_flow() {  # issue 16: measure what the node has, plan --prefer fastest, install it, measure everything
  local h=$1 w
  echo "== verification #1 (${VERIFY1_MODE:-quick}: what the node has before — the SDPA backends)"
  mark verify1_start
  fleetctl verify "$h" $([[ "${VERIFY1_MODE:-quick}" == quick ]] && echo --quick) --timeout 1500 --json \
    > "$E2E/verify1.json"; echo "rc=$?"
  mark verify1_end
  fleetctl attention report --json > "$E2E/attention-before.json"
  fleetctl node "$h" > "$E2E/node-before.txt" 2>&1
  for w in training prefill decode; do
    fleetctl rollout flash-attn --nodes "$h" --prefer fastest --workload "$w" --dry-run \
      > "$E2E/plan-fastest-$w-before.txt" 2>&1
  done
  R=(flash-attn --prefer fastest --workload prefill --nodes "$h" --canary 0 --batch 1 --max-failures 1
     --verify-mode full --step-timeout install-wheel=900,verify=1500,rollback=600)
  fleetctl rollout "${R[@]}" --dry-run | tee "$E2E/plan1.txt"
  fleetctl rollout "${R[@]}" --dry-run --json > "$E2E/plan1.json"
  echo "== rollout #1 (--prefer fastest --workload prefill)"; rollout 1 "${R[@]}"
  installed after-rollout1
  fleetctl node "$h" > "$E2E/node-after.txt" 2>&1
  fleetctl attention report > "$E2E/attention-after.txt" 2>&1
  fleetctl attention report --json > "$E2E/attention-after.json"
  for w in training prefill decode; do
    fleetctl rollout flash-attn --nodes "$h" --prefer fastest --workload "$w" --dry-run \
      > "$E2E/plan-fastest-$w-after.txt" 2>&1
  done
  tail -40 "$E2E/attention-after.txt"
}

fa2_sdist() { if [[ -n "${E2E_FA2_SDIST:-}" ]]; then echo "$E2E_FA2_SDIST"; else ls "$STASH"/fa2/flash_attn-*.tar.gz | head -1; fi; }

attention_fa2_flow() {  # issue 16 with FA2: build FA2 through the agent, install FA4 beside it, measure all at once
  local h=$1 w
  R=(flash-attn --version "$FA2_VERSION" --prefer compatible --nodes "$h" --canary 0 --batch 1 --max-failures 1
     --verify-mode quick --step-timeout build-from-source=1800,install-wheel=900,verify=900,rollback=600)
  fleetctl rollout "${R[@]}" --dry-run | tee "$E2E/plan1.txt"
  fleetctl rollout "${R[@]}" --dry-run --json > "$E2E/plan1.json"
  grep -q "fa2-source" "$E2E/plan1.txt" || echo "WARNING: the FA2 plan is not fa2-source"
  echo "== rollout #1 (FA2 $FA2_VERSION from the trimmed sdist: build-from-source, install, quick verification)"
  rollout 1 "${R[@]}"
  installed after-rollout1
  R=(flash-attn --fa4 --nodes "$h" --canary 0 --batch 1 --max-failures 1 --verify-mode full
     --step-timeout install-wheel=900,verify=1500,rollback=600)
  fleetctl rollout "${R[@]}" --dry-run | tee "$E2E/plan2.txt"
  fleetctl rollout "${R[@]}" --dry-run --json > "$E2E/plan2.json"
  echo "== rollout #2 (--fa4 beside FA2, full verification of every implementation)"
  rollout 2 "${R[@]}"
  installed after-rollout2
  # both in one env: FA2's flash_attn package (its __init__ and extension) and FA4's flash_attn/cute
  env -u PYTHONPATH "$TARGET_PY" - >> "$E2E/venv-after-rollout2.txt" 2>&1 <<'PY'
import importlib, os
for name in ("flash_attn", "flash_attn.cute"):
    try:
        m = importlib.import_module(name)
        print(f"import {name}: ok, {getattr(m, '__version__', None)} at {m.__file__}")
    except Exception as exc:  # noqa: BLE001
        print(f"import {name}: {type(exc).__name__}: {exc}")
try:
    import flash_attn
    cute = os.path.join(os.path.dirname(flash_attn.__file__), "cute")
    print("flash_attn/cute/flash_fwd_sm90.py (FA4's, not in FA2 2.8.3):", os.path.exists(os.path.join(cute, "flash_fwd_sm90.py")))
except Exception as exc:  # noqa: BLE001
    print(f"flash_attn: {type(exc).__name__}: {exc}")
PY
  tail -5 "$E2E/venv-after-rollout2.txt"
  fleetctl node "$h" > "$E2E/node-after.txt" 2>&1
  fleetctl attention report > "$E2E/attention-after.txt" 2>&1
  fleetctl attention report --json > "$E2E/attention-after.json"
  for w in training prefill decode; do
    fleetctl rollout flash-attn --nodes "$h" --prefer fastest --workload "$w" --dry-run \
      > "$E2E/plan-fastest-$w-after.txt" 2>&1
  done
  tail -40 "$E2E/attention-after.txt"
}

case "$PHASE" in
  stash)
    mkdir -p "$STASH"
    for d in "$@"; do name=$(basename "$d"); cp -r "$d" "$STASH/${name#.}"; done  # .whl → whl
    du -sh "$STASH"/*
    ;;

  run|attention|attention-fa2)
    rm -rf "$E2E"; mkdir -p "$E2E"/{logs,run,wheels,node}
    echo "$PHASE" > "$E2E/flow"  # collect names the spans and the run after the flow that ran
    mark begin
    if [[ -n "$SITE" ]]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$STASH"/whl*/*.whl || { echo "SETUP FAILED: project wheels"; exit 1; }
    fi
    if [[ -n "${E2E_FA4_WHEELS:-}" ]]; then cp "$E2E_FA4_WHEELS"/*.whl "$E2E/wheels/"
    else  # reassemble the parts fa4_wheelhouse.sh made
      for f in "$STASH"/part-*/*; do case "$f" in *.whl.part-*) ;; *) cp -f "$f" "$E2E/wheels/" ;; esac; done
      for first in "$STASH"/part-*/*.whl.part-00; do
        [[ -e "$first" ]] || continue
        name=$(basename "${first%.part-00}")
        for i in $(seq -w 0 99); do piece=$(ls "$STASH"/part-*/"$name.part-$i" 2>/dev/null) || break; cat "$piece"; done \
          > "$E2E/wheels/$name"
      done
      (cd "$E2E/wheels" && sha256sum -c --quiet SHA256SUMS) || { echo "SETUP FAILED: wheel checksums"; exit 1; }
    fi
    echo "wheels: $(ls "$E2E"/wheels/*.whl | wc -l), $(du -sh "$E2E/wheels" | cut -f1)"
    "$TARGET_PY" -c "import torch, sys; print('target', sys.version.split()[0], torch.__version__, torch.version.cuda)"
    installed before

    mark controller_start
    (cd "$E2E/run" && exec setsid nohup "$PY" -m fleetctl.controller.main serve --state-dir "$E2E/controller" --offline \
      --grpc-listen "127.0.0.1:$GRPC_PORT" --enroll-listen "127.0.0.1:$((GRPC_PORT + 1))" \
      --http-listen "127.0.0.1:$HTTP_PORT" >> "$E2E/logs/controller.log" 2>&1 < /dev/null) &
    echo $! > "$E2E/controller.pid"
    for _ in $(seq 1 60); do fleetctl artifact list >/dev/null 2>&1 && break; sleep 1; done
    fleetctl artifact list > /dev/null || { echo "controller did not come up"; tail -30 "$E2E/logs/controller.log"; exit 1; }
    mark store_start
    for w in "$E2E"/wheels/*.whl; do fleetctl artifact add "$w" --kind wheel > /dev/null || exit 1; done
    if [[ "$PHASE" == attention-fa2 ]]; then
      SD=$(fa2_sdist); [[ -f "$SD" ]] || { echo "SETUP FAILED: no FA2 sdist (E2E_FA2_SDIST or $STASH/fa2/)"; exit 1; }
      tar -xzOf "$SD" --wildcards '*/TRIMMED.txt' 2>/dev/null | head -3
      fleetctl artifact add "$SD" --kind sdist --name "flash_attn-$FA2_VERSION.tar.gz" || exit 1
    fi
    mark store_end
    fleetctl artifact list | tail -3

    token=$(fleetctl token create --ttl 1h --json | jq_py 'd["token"]')
    args=(run --controller "127.0.0.1:$GRPC_PORT" --ca "$E2E/controller/ca/ca.pem" --state-dir "$E2E/agent"
          --python "$TARGET_PY" --executor ansible --node-state-dir "$E2E/node" --token "$token")
    [[ -n "$SIMULATE" ]] && args+=(--simulate "$SIMULATE" --hostname "${E2E_HOSTNAME:-rehearsal-h200}")
    (cd "$E2E/run" && exec setsid nohup "$PY" -m fleetctl.agent.main "${args[@]}" >> "$E2E/logs/agent.log" 2>&1 < /dev/null) &
    echo $! > "$E2E/agent.pid"
    for _ in $(seq 1 120); do
      [[ $(fleetctl nodes --json 2>/dev/null | jq_py "any(n['status'] in ('online','degraded') for n in d['nodes'])") == True ]] && break
      sleep 1
    done
    mark agent_online
    H=$(fleetctl nodes --json | jq_py 'd["nodes"][0]["hostname"]'); echo "$H" > "$E2E/hostname"
    fleetctl nodes
    if [[ "$PHASE" == attention ]]; then attention_flow "$H"; mark end; bash "$0" collect; exit; fi
    if [[ "$PHASE" == attention-fa2 ]]; then attention_fa2_flow "$H"; mark end; bash "$0" collect; exit; fi
    R=(flash-attn --fa4 --nodes "$H" --canary 0 --batch 1 --max-failures 1 --verify-mode "$VERIFY_MODE"
       --step-timeout install-wheel=900,verify=900,rollback=600)
    fleetctl rollout "${R[@]}" --dry-run | tee "$E2E/plan1.txt"
    fleetctl rollout "${R[@]}" --dry-run --json > "$E2E/plan1.json"
    grep -q "CANNOT BE HAD" "$E2E/plan1.txt" && { echo "PREFLIGHT: something cannot be had"; exit 1; }

    echo "== rollout #1 (--fa4)"; rollout 1 "${R[@]}"
    installed after-rollout1
    RID1=$(jq_py 'd["id"]' < "$E2E/rollout1.json")
    echo "== rollback"; rollout 2 rollback "$RID1"
    installed after-rollback
    for _ in $(seq 1 60); do  # the agent reports what the rollback left on its next heartbeat
      [[ $(fleetctl node "$H" --json | jq_py '(d.get("facts") or {}).get("flash_attn") is None') == True ]] && break
      sleep 1
    done
    mark facts_after_rollback
    fleetctl node "$H" --json | jq_py '{"status": d["status"], "flash_attn": (d.get("facts") or {}).get("flash_attn")}' \
      | tee "$E2E/node-after-rollback.json"
    echo "== rollout #3 (--fa4 again)"; rollout 3 "${R[@]/#$VERIFY_MODE/quick}"
    installed after-rollout3
    mark end
    bash "$0" collect
    ;;

  collect)
    OUTDIR=${OUT:-$E2E/out}
    C="$E2E/collect"; rm -rf "$C"; mkdir -p "$C/jobs"
    H=$(cat "$E2E/hostname")
    fleetctl node "$H" --json > "$C/node.json"
    jq_py 'd["facts"]' < "$C/node.json" > "$C/facts.json"
    for j in $("$PY" -c "from fleetctl.controller.client import ControllerClient as C
print(' '.join(j['id'] for j in C.discover().get('/jobs', node='$H', limit=1000)['jobs']))"); do
      fleetctl job "$j" --json > "$C/jobs/$j.json"
    done
    cp "$E2E"/rollout*.json "$E2E"/rollout*.txt "$E2E"/plan1.* "$E2E"/plan2.* "$E2E"/venv-*.txt "$E2E"/node-after-rollback.json \
       "$E2E"/verify1.json "$E2E"/attention-*.* "$E2E"/plan-fastest-*.txt "$E2E"/node-before.txt "$E2E"/node-after.txt \
       "$E2E/times" "$C/" 2>/dev/null
    fleetctl artifact list --json > "$C/artifacts.json"
    "$PY" - "$E2E/controller/controller.db" "$C/controller.db" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst); dst.close(); src.close()
PY
    tail -c 1000000 "$E2E/logs/controller.log" > "$C/controller.log"
    tail -c 1000000 "$E2E/logs/agent.log" > "$C/agent.log"
    "$PY" - "$E2E" "$C" "${E2E_COMMIT:-}" "$(cat "$E2E/flow" 2>/dev/null || echo run)" > "$C/timing.txt" <<'PY'
import datetime as dt, json, pathlib, socket, sys
E, C, flow = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[4]
marks = dict(l.split("=", 1) for l in (E / "times").read_text().split() if "=" in l)
def span(a, b):
    return f"{float(marks[b]) - float(marks[a]):.1f} s" if a in marks and b in marks else "?"
print(f"store filled (fleetctl artifact add of every wheel): {span('store_start', 'store_end')}")
print(f"controller start → agent online: {span('controller_start', 'agent_online')}")
if flow == "attention":
    print(f"verify1 (fleetctl verify, before the rollout): {span('verify1_start', 'verify1_end')}")
    print(f"rollout #1 (--prefer fastest --workload prefill): {span('rollout1_start', 'rollout1_end')}")
    what = ("scripts/device/e2e_fa4.sh attention: issue 16, verification of what the node has, --prefer fastest "
            "plans per workload, rollout --prefer fastest --workload prefill, full verification (docs/gpu-e2e.md)")
elif flow == "attention-fa2":
    print(f"rollout #1 (FA2 from the trimmed sdist: build, install, quick verify): {span('rollout1_start', 'rollout1_end')}")
    print(f"rollout #2 (--fa4 beside FA2, full verification): {span('rollout2_start', 'rollout2_end')}")
    what = ("scripts/device/e2e_fa4.sh attention-fa2: issue 16, FA2 (trimmed sdist, scripts/device/fa2_trim.py) built "
            "through the agent, FA4 installed beside it, one full verification of FA2, FA4 and every SDPA backend, "
            "--prefer fastest plans per workload (docs/gpu-e2e.md)")
else:
    print(f"rollback end → facts without flash-attn-4: {span('rollout2_end', 'facts_after_rollback')}")
    for n, label in ((1, "rollout #1 --fa4"), (2, "rollback"), (3, "rollout #3 --fa4 again")):
        print(f"{label}: {span(f'rollout{n}_start', f'rollout{n}_end')}")
    what = "scripts/device/e2e_fa4.sh: issue 12, rollout --fa4 / rollback / again (docs/gpu-e2e.md)"
def t(x):
    return dt.datetime.fromisoformat(x) if x else None
for p in sorted(C.glob("jobs/*.json"), key=lambda p: json.loads(p.read_text()).get("created_at") or ""):
    j = json.loads(p.read_text())
    a, b, c = t(j.get("created_at")), t(j.get("dispatched_at")), t(j.get("finished_at"))
    dur = f"{(c - (b or a)).total_seconds():7.1f} s" if c and (b or a) else "      ?  "
    fetched = [e.get("data") or {} for e in j.get("events") or [] if e.get("event") == "fleet_artifact_fetch"]
    got = f"  fetched {len(fetched)} file(s), {sum(int(d.get('bytes') or 0) for d in fetched) / 2**20:.1f} MiB" \
        if fetched else ""
    print(f"{j.get('kind', '?'):<14} {j.get('status', '?'):<10} {dur}  job {j.get('id')}{got}")
node = json.loads((C / "node.json").read_text())
meta = {"simulated": bool(node.get("simulated")), "rehearsal": bool((node.get("extra") or {}).get("rehearsal")),
        "hostname": node.get("hostname"), "machine": socket.gethostname(), "commit": sys.argv[3] or None,
        "collected_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "what": what}
(C / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
PY
    cat "$C/timing.txt"
    for p in agent controller; do alive "$E2E/$p.pid" && kill "$(cat "$E2E/$p.pid")"; done
    mkdir -p "$OUTDIR"
    tar -C "$C" -czf "$OUTDIR/e2e_fa4.tar.gz" . && ls -la "$OUTDIR/e2e_fa4.tar.gz"
    ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac

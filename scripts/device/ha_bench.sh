#!/usr/bin/env bash
# Issue 17's throughput benchmark (benchmarks/ha_throughput.py) on the lent machine: 16 cores, where this VM's
# 2 shared cores starve the controllers, the load generators and PostgreSQL alike. The machine has no network
# and no PostgreSQL, so both are carried (ignored paths, `carry: [".device/ha"]`):
#
#   .device/ha/whl/*.whl        the controller's locked wheels for CPython 3.12 (requirements/controller.txt):
#                               pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 …
#   .device/ha/pgserver-*.whl   PyPI's pgserver wheel: a relocatable PostgreSQL 16 build (only its binaries are used)
#
# From the repository root:  scripts/device/ha_bench.sh [ha_throughput options…]
# It installs the wheels into $SITE, starts PostgreSQL on 127.0.0.1:$PGPORT as an unprivileged user (PostgreSQL
# refuses to run as root), runs the benchmark with the device's python3, and leaves the JSON, the printed table
# and the machine's facts under $OUT.
set -euo pipefail
REPO=$(pwd)
CARRY=${CARRY:-$REPO/.device/ha}
SITE=${SITE-/tmp/ha-site}
PGROOT=${PGROOT:-/tmp/ha-pg}
PGPORT=${PGPORT:-5432}
OUT=${OUT:-/tmp/ha-out}
PY=${PY:-python3}  # a rehearsal here: PY=.venv/bin/python SITE= PGPORT=5439 scripts/device/ha_bench.sh …
mkdir -p "$OUT"

if [[ -n "$SITE" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$CARRY"/whl/*.whl
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}"

rm -rf "$PGROOT" && mkdir -p "$PGROOT"
"$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
[z.extract(n, sys.argv[2]) for n in z.namelist() if n.startswith(('pgserver/pginstall/', 'pgserver.libs/'))]" \
    "$(ls "$CARRY"/pgserver-*.whl)" "$PGROOT"
chmod -R a+rX "$PGROOT"
chmod a+x "$PGROOT"/pgserver/pginstall/bin/*
PGBIN=$PGROOT/pgserver/pginstall/bin
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u fleetpg -- "$@"; else "$@"; fi; }
[[ $(id -u) -ne 0 ]] || id fleetpg >/dev/null 2>&1 || useradd -r -M -s /bin/false fleetpg
mkdir -p "$PGROOT/data" "$PGROOT/sock"
[[ $(id -u) -ne 0 ]] || chown fleetpg "$PGROOT/data" "$PGROOT/sock"
as_pg "$PGBIN/initdb" -D "$PGROOT/data" -U postgres --auth=trust >"$OUT/initdb.log"
as_pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/sock/server.log" -w \
    -o "-h 127.0.0.1 -p $PGPORT -k $PGROOT/sock -c max_connections=400 -c shared_buffers=1GB" start >/dev/null
trap 'as_pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -m fast stop >/dev/null 2>&1 || true; cp "$PGROOT/sock/server.log" "$OUT/" 2>/dev/null || true' EXIT

{ echo "date: $(date -u +%FT%TZ)"; echo "nproc: $(nproc)"; grep -m1 "model name" /proc/cpuinfo; free -g | sed -n 2p;
  uname -r; "$PY" --version; "$PGBIN/postgres" --version; uptime; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"
"$PY" -m benchmarks.ha_throughput --python "$PY" --pg "host=127.0.0.1 port=$PGPORT user=postgres dbname=postgres" \
    --json-out "$OUT/ha_throughput.json" "$@" 2>"$OUT/stderr.log" | tee "$OUT/ha_throughput.txt"

"""``fleet-controller serve``: run the controller (gRPC for agents, HTTP API) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from controller.context import DEFAULT_STATE_DIR, ControllerSettings
from controller.ratelimit import ENROLL_OVERALL, ENROLL_PER_SOURCE, Rate
from controller.upstream import DEFAULT_INDEX_URL, UpstreamConfig
from fleet.errors import UsageError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the controller",
                              description="Serve the agent API (gRPC, mutual TLS; enrollment on the next port) "
                                          "and the HTTP API in one process. Writes STATE/controller.json.")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help="state directory (default ./state/controller)")
    p.add_argument("--db", metavar="URL", help="database URL (default sqlite:///STATE/controller.db; "
                   "postgresql+psycopg://user@host/db for PostgreSQL)")
    p.add_argument("--grpc-listen", default="127.0.0.1:7443", metavar="HOST:PORT",
                   help="agent port, mutual TLS (default 127.0.0.1:7443)")
    p.add_argument("--enroll-listen", metavar="HOST:PORT", help="enrollment port (default: agent port + 1)")
    p.add_argument("--http-listen", default="127.0.0.1:7480", metavar="HOST:PORT",
                   help="HTTP API and dashboard (default 127.0.0.1:7480)")
    p.add_argument("--heartbeat-interval", type=float, default=10.0, metavar="S",
                   help="heartbeat interval asked of agents (default 10 s)")
    p.add_argument("--missed-heartbeats", type=int, default=3, metavar="N",
                   help="a node missing N intervals turns offline (default 3)")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP for the server certificate (repeatable)")
    p.add_argument("--no-gc-tuning", dest="gc_tuning", action="store_false",
                   help="keep CPython's default garbage collector settings (by default objects alive after "
                        "start-up and registration bursts are frozen and the gen-0 threshold is raised)")
    p.add_argument("--upstream-index", default=DEFAULT_INDEX_URL, metavar="URL",
                   help="PEP 503 package index for sdists, flash-attn-4 and dependency wheels (default "
                        f"{DEFAULT_INDEX_URL}; a local mirror such as devpi or Artifactory works; 'none': no index)")
    p.add_argument("--wheel-mirror", metavar="URL",
                   help="fetch flash-attn release wheels from here, not GitHub (URL/vVERSION/FILE, then URL/FILE)")
    p.add_argument("--offline", action="store_true",
                   help="never fetch: plans use only the artifact store (fill it with `fleetctl bundle import`)")
    p.add_argument("--enroll-rate", type=float, default=None, metavar="PER_S",
                   help="enrollment attempts allowed per second overall (default 50, burst 200; per source "
                        "address 1/s, burst 20); a lab load test enrolling thousands of agents from one host "
                        "raises it (see docs/security.md, Abuse limits)")
    p.add_argument("--trusted-keyring", type=Path, metavar="FILE",
                   help="OpenPGP public keys of the operators (gpg --export --armor KEYID... > FILE): a signature "
                        "sent with `fleetctl artifact add --sig` must come from one of them, else the upload is "
                        "refused; the signer's fingerprint is recorded (docs/security.md, Artifacts and provenance)")
    p.add_argument("--require-signed", action="store_true",
                   help="refuse `fleetctl artifact add` uploads without a signature (needs --trusted-keyring)")
    p.add_argument("--log-level", default=os.environ.get("FLEET_LOG_LEVEL", "INFO"))
    p.set_defaults(handler=handle)


def settings_from(args: argparse.Namespace) -> ControllerSettings:
    check_signing_args(args)
    per_source, overall = enroll_rates(getattr(args, "enroll_rate", None))
    return ControllerSettings(state_dir=args.state_dir, db_url=args.db, grpc_listen=args.grpc_listen,
                              enroll_listen=args.enroll_listen, http_listen=args.http_listen,
                              heartbeat_interval=args.heartbeat_interval, missed_heartbeats=args.missed_heartbeats,
                              extra_names=list(args.san), gc_tuning=args.gc_tuning,
                              upstream=upstream_from(args), enroll_per_source=per_source, enroll_overall=overall,
                              trusted_keyring=getattr(args, "trusted_keyring", None),
                              require_signed=getattr(args, "require_signed", False))


def check_signing_args(args: argparse.Namespace) -> None:
    if getattr(args, "require_signed", False) and getattr(args, "trusted_keyring", None) is None:
        raise UsageError("--require-signed needs --trusted-keyring FILE (the keys a signature must come from)",
                         hint="export the operators' public keys: gpg --export --armor KEYID... > FILE")


def enroll_rates(per_second: float | None) -> tuple[Rate, Rate]:
    """``--enroll-rate N``: N/s overall with a burst of 4 N, and per source address the same (one host may be
    the whole load test)."""
    if per_second is None:
        return ENROLL_PER_SOURCE, ENROLL_OVERALL
    if per_second <= 0:
        raise UsageError(f"--enroll-rate {per_second:g} must be positive", hint="attempts per second, e.g. 500")
    rate = Rate(burst=4 * per_second, per_second=per_second)
    return rate, rate


def upstream_from(args: argparse.Namespace) -> UpstreamConfig:
    index = None if args.upstream_index in ("", "none") else args.upstream_index
    for name, url in (("--upstream-index", index), ("--wheel-mirror", args.wheel_mirror)):
        if url is not None and not url.startswith(("http://", "https://", "file://")):
            raise UsageError(f"{name} {url!r} is not an http(s) or file URL", hint=f"e.g. {name} https://host/path")
    return UpstreamConfig(index_url=index, wheel_mirror=args.wheel_mirror, offline=args.offline)


def handle(args: argparse.Namespace) -> int:
    # every message one line, control characters escaped: node- and client-supplied text is logged (fleet/text.py)
    from fleet.text import install_safe_logging

    install_safe_logging(args.log_level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from controller.serve import serve

    asyncio.run(serve(settings_from(args)))
    return 0

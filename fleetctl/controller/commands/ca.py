"""``fleet-controller ca import|show``: bring your own CA (controller/ca.py ``import_ca``).

Runs on the controller host against its state dir, with the controller stopped (it reads the CA at start).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509

from fleetctl.controller.ca import import_ca
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.errors import InputError, UsageError
from fleetctl.fleet.statedir import DEFAULT_STATE_DIR


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ca", help="the controller's certificate authority",
                              description="Show the controller's CA, or replace it with your own (a root, or an "
                                          "intermediate with its chain). Run with the controller stopped.")
    sub = p.add_subparsers(dest="ca_command", metavar="ACTION")
    sub.required = True
    imp = sub.add_parser("import", help="use your own CA certificate and key",
                         description="Check, then install, a CA certificate and its key (EC or RSA, unencrypted "
                                     "PEM) as the controller's CA: it signs the server certificate and every agent "
                                     "certificate from the next start on. An intermediate needs --chain with its "
                                     "issuers up to the root; agents then need only the root as --ca. A failed "
                                     "check changes nothing; the replaced CA is kept in STATE/ca/previous-TIME/. "
                                     "Agents enrolled under the replaced CA must enroll again.")
    imp.add_argument("--cert", type=Path, required=True, metavar="FILE", help="the CA certificate (PEM)")
    imp.add_argument("--key", type=Path, required=True, metavar="FILE", help="its private key (PEM, unencrypted)")
    imp.add_argument("--chain", type=Path, metavar="FILE",
                     help="the certificates above an intermediate, its issuer first, up to the root (PEM)")
    imp.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="controller state dir")
    imp.add_argument("--db", metavar="URL",
                     help="the controllers' PostgreSQL database (postgresql+psycopg://…): the CA is replaced there "
                          "too, for every controller from its next start (docs/ha.md)")
    imp.add_argument("--ca-kek-file", type=Path, metavar="FILE",
                     help="with --db: seal the key with this key-encryption key (the controllers' ca_kek_file)")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(handler=handle_import)
    show = sub.add_parser("show", help="the CA agents must trust (STATE/ca/ca.pem)")
    show.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="controller state dir")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=handle_show)


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{flag} {path}: {exc.strerror or exc}", hint="name a readable PEM file") from None


def handle_import(args: argparse.Namespace) -> int:
    if args.db and args.db.startswith("sqlite"):
        raise UsageError("--db is for the PostgreSQL database several controllers share",
                         hint="on SQLite leave --db out: the CA is in the state dir")
    if not args.db:
        imported = import_ca(args.state_dir / "ca", _read(args.cert, "--cert"), _read(args.key, "--key"),
                             _read(args.chain, "--chain") if args.chain else None)
    else:
        # imported here, not at the top: the database layer is heavy for `ca show`
        from fleetctl.controller.shared_ca import check_replaceable, read_kek, replace_shared_ca
        from fleetctl.controller.store import open_store

        kek = read_kek(args.ca_kek_file) if args.ca_kek_file else None
        store = open_store(args.db)
        try:
            check_replaceable(store, kek)  # before anything changes
            imported = import_ca(args.state_dir / "ca", _read(args.cert, "--cert"), _read(args.key, "--key"),
                                 _read(args.chain, "--chain") if args.chain else None)
            replace_shared_ca(store, (args.state_dir / "ca" / "ca.key").read_bytes(),
                              (args.state_dir / "ca" / "ca.pem").read_bytes(), kek, f"imported: {imported.subject}")
        finally:
            store.close()
    data = {"subject": imported.subject, "intermediate": imported.intermediate,
            "not_after": imported.not_after.isoformat(), "chain": imported.chain,
            "previous": str(imported.previous) if imported.previous else None,
            "ca_file": str(args.state_dir / "ca" / "ca.pem")}
    if args.json:
        print_json(data)
        return 0
    kind = "intermediate CA" if imported.intermediate else "root CA"
    print(f"imported {kind} {imported.subject} (valid until {imported.not_after:%Y-%m-%d}"
          f"{f', {imported.chain} certificate(s) of chain' if imported.chain else ''})")
    if imported.previous:
        print(f"the replaced CA is kept in {imported.previous}; agents enrolled under it must enroll again")
    print("start (or restart) the controller; agents verify it with --ca set to the root of this CA")
    return 0


def handle_show(args: argparse.Namespace) -> int:
    path = args.state_dir / "ca" / "ca.pem"
    certs = x509.load_pem_x509_certificates(_read(path, "CA file"))
    now = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = [{"subject": c.subject.rfc4514_string(), "issuer": c.issuer.rfc4514_string(),
             "not_after": c.not_valid_after_utc.isoformat(), "expired": c.not_valid_after_utc <= now} for c in certs]
    if args.json:
        print_json({"ca_file": str(path), "certificates": rows})
        return 0
    print(f"{path}:")
    for row in rows:
        print(f"  {row['subject']}  (issued by {row['issuer']}, until {row['not_after'][:10]})")
    return 0

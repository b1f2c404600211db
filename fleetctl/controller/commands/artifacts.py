"""``fleetctl artifact add FILE [--kind K] [--name N] [--sig FILE.sig]`` and ``fleetctl artifact list [--json]``.

Through the controller's HTTP API (``POST``/``GET /api/v1/artifacts``) into its content-addressed
artifact store: sdists that air-gapped nodes build from (``flash_attn-<version>.tar.gz``, kind ``sdist``),
wheels, apt keys. ``--sig`` sends a detached OpenPGP signature with the file: a controller started with
``--trusted-keyring`` checks it and records the signer (controller/signatures.py).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from fleetctl.controller.client import ControllerClient, add_controller_args
from fleetctl.fleet.cli import add_output_args, print_json, print_structured
from fleetctl.fleet.errors import ControllerUnavailable, FleetError, InputError

KINDS = ("sdist", "wheel", "apt-key", "other")


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("artifact", help="put files in the controller's artifact store; list them",
                                description="The controller's content-addressed artifact store (sha256): sdists "
                                            "nodes build from, wheels they install, apt keys.")
    sub = top.add_subparsers(dest="artifact_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("add", help="upload a file (sha256 checked by the controller)")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--kind", choices=KINDS, help="default: from the name (.tar.gz sdist, .whl wheel, .gpg/.asc/.pub "
                                                 "apt-key)")
    p.add_argument("--name", metavar="N", help="file name in the store (default: FILE's base name)")
    p.add_argument("--sig", type=Path, metavar="FILE.sig",
                   help="detached OpenPGP signature of FILE (gpg --detach-sign [--armor] FILE): the controller "
                        "checks it against its --trusted-keyring and records the signer, or refuses the file")
    p.add_argument("--json", action="store_true")
    add_controller_args(p)
    p.set_defaults(handler=handle_add)
    p = sub.add_parser("list", help="list stored artifacts")
    p.add_argument("--kind", choices=KINDS)
    add_output_args(p, what="{\"artifacts\": [...]} (wide: full sha256)")
    add_controller_args(p)
    p.set_defaults(handler=handle_list)


def guess_kind(name: str) -> str:
    if name.endswith((".tar.gz", ".tgz", ".zip")):
        return "sdist"
    if name.endswith(".whl"):
        return "wheel"
    if name.endswith((".gpg", ".asc", ".pub", ".key")):
        return "apt-key"
    return "other"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


MAX_SIG_BYTES = 8 * 1024  # the controller's limit (controller/signatures.py MAX_SIGNATURE_BYTES)


def read_signature(sig: Path) -> str:
    """``--sig FILE``: its bytes, base64 (header ``X-Fleet-Signature``)."""
    try:
        data = sig.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the signature {sig}: {exc.strerror or exc}",
                         hint="check the path; make one with gpg --detach-sign FILE") from exc
    if not data or len(data) > MAX_SIG_BYTES:
        raise InputError(f"{sig} has {len(data)} bytes; a detached OpenPGP signature is 1 to {MAX_SIG_BYTES}",
                         hint="give the detached signature (gpg --detach-sign FILE writes FILE.sig), not the file")
    return base64.b64encode(data).decode("ascii")


def upload(client: ControllerClient, path: Path, kind: str, name: str | None = None, *,
           bundle: tuple[str, str] | None = None, sig: Path | None = None) -> dict[str, Any]:
    """Stream ``path`` to ``POST /api/v1/artifacts``; returns the stored artifact's JSON. ``bundle``: (lock
    digest, bundle file name) — recorded as imported from that bundle instead of added by hand. ``sig``: a
    detached signature of ``path``, checked by the controller."""
    try:
        size = path.stat().st_size
        sha = _digest(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", hint="check the path") from exc
    signature = read_signature(sig) if sig is not None else None

    def body() -> Iterator[bytes]:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                yield block

    params = {"filename": name or path.name, "kind": kind, "sha256": sha}
    if bundle is not None:
        params.update(bundle_lock=bundle[0], bundle=bundle[1])
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    if signature is not None:
        headers["X-Fleet-Signature"] = signature
    try:
        resp = client._http.post("/api/v1/artifacts", params=params, content=body(), headers=headers,
                                 timeout=httpx.Timeout(600.0, connect=10.0))
    except httpx.HTTPError as exc:
        raise ControllerUnavailable(f"uploading {path.name} to {client.base_url} failed: {exc}",
                                    hint="check that the controller is running") from exc
    data = client.decode(resp, f"the upload of {path.name}")
    if not isinstance(data, dict) or data.get("sha256") != sha:
        raise FleetError(f"the controller stored {path.name} with an unexpected digest: {data}",
                         hint="upload it again")
    return data


def handle_add(args: argparse.Namespace) -> int:
    client = ControllerClient.from_args(args)
    kind = args.kind or guess_kind(args.name or args.file.name)
    info = upload(client, args.file, kind, args.name, sig=args.sig)
    if args.json:
        print_json(info)
    else:
        print(f"stored {info['filename']} ({info['kind']}, {info['size']} bytes) sha256 {info['sha256']}")
        signers = sorted({str(p["signer"]) for p in info.get("provenance", []) if p.get("signer")})
        if signers:
            print(f"signed by {', '.join(signers)}")
    return 0


def source_column(artifact: dict[str, Any]) -> str:
    """Where the file came from (``user``, ``upstream``, ``build``, ``bundle``, ``legacy``); ``--json`` has the
    details (actor, URL, build job and key, bundle lock) under ``provenance``."""
    return str(artifact.get("source") or "legacy")


def handle_list(args: argparse.Namespace) -> int:
    arts = ControllerClient.from_args(args).get("/artifacts")["artifacts"]
    if args.kind:
        arts = [a for a in arts if a["kind"] == args.kind]
    if print_structured(args, {"artifacts": arts}):
        return 0
    digest_chars = 64 if args.output == "wide" else 16
    for a in arts:
        print(f"{a['sha256'][:digest_chars]}  {a['kind']:<7} {a['size']:>12}  {a['created'][:19]}  "
              f"{source_column(a):<9} {a['filename']}")
    if not arts:
        print("no artifacts")
    return 0

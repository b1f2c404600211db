"""``fleetctl catalog list|add|import``: the wheels ``fleetctl plan`` may choose from (offline)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fleetctl.controller.catalog import (
    Catalog,
    add_user_wheels,
    default_catalog,
    load_catalog_file,
    wheel_from_entry,
)
from fleetctl.controller.resolver import Policy
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.errors import NotFoundError
from fleetctl.fleet.statedir import DEFAULT_STATE_DIR


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("catalog", help="list or extend the wheel catalog",
                                   description="Built-in upstream wheels plus user additions stored in "
                                               "<state-dir>/catalog.json. No network needed.")
    parser.add_argument("--state-dir", default=os.environ.get("FLEETCTL_STATE_DIR", str(DEFAULT_STATE_DIR)),
                        help="controller state dir (user additions live in catalog.json there)")
    sub = parser.add_subparsers(dest="catalog_command", metavar="ACTION")
    sub.required = True

    lister = sub.add_parser("list", help="per release: wheel count, glibc floor, archs; --version for its wheels")
    lister.add_argument("--catalog", metavar="FILE", help="list this catalog file instead")
    lister.add_argument("--version", metavar="V", help="list every wheel of one release")
    lister.add_argument("--json", action="store_true")
    lister.set_defaults(handler=run_list)

    adder = sub.add_parser("add", help="add one wheel by filename")
    adder.add_argument("filename", help="e.g. flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl")
    adder.add_argument("--url", help="where nodes fetch it")
    adder.add_argument("--sha256", help="hex digest of the wheel")
    adder.add_argument("--min-glibc", help='glibc of the OS it was built on, e.g. "2.35"')
    adder.add_argument("--cuda-archs", help='SASS it carries, e.g. "80;90" (default: the release\'s upstream set)')
    adder.set_defaults(handler=run_add)

    importer = sub.add_parser("import", help="add every wheel of a catalog file (JSON or one filename per line)")
    importer.add_argument("file", help="catalog file")
    importer.set_defaults(handler=run_import)


def run_list(args: argparse.Namespace) -> int:
    catalog = load_catalog_file(Path(args.catalog)) if args.catalog else default_catalog(Path(args.state_dir))
    if args.version:
        version = Policy.check_version(args.version)
        wheels = [w for w in catalog.wheels if w.name.version == version]
        if not wheels:
            raise NotFoundError(f"no wheels for flash-attn {version} in the catalog",
                                hint="run `fleetctl catalog list` for the releases it has")
        catalog = Catalog(wheels)
    if args.json:
        print_json(catalog.to_json())
        return 0
    if args.version:
        for w in catalog.wheels:
            print(f"{w.filename}  glibc≥{w.min_glibc or '?'}  {w.origin}")
        return 0
    print(f"{'RELEASE':<14} {'WHEELS':>6}  {'GLIBC≥':<7} {'ARCHS':<16} ORIGIN")
    for release in catalog.releases:
        wheels = [w for w in catalog.wheels if w.name.version == release]
        glibcs = sorted({w.min_glibc or "?" for w in wheels})
        archs = sorted({a for w in wheels for a in w.cuda_archs})
        origins = sorted({w.origin for w in wheels})
        print(f"{release:<14} {len(wheels):>6}  {','.join(glibcs):<7} {','.join(map(str, archs)):<16} "
              f"{','.join(origins)}")
    print(f"\n{len(catalog)} wheel(s); default target: {catalog.newest_release or '(none)'}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    entry = {"filename": args.filename, "url": args.url, "sha256": args.sha256, "min_glibc": args.min_glibc,
             "cuda_archs": args.cuda_archs}
    wheel = wheel_from_entry(entry, "user", "catalog add")
    path, added = add_user_wheels(Path(args.state_dir), Catalog([wheel]))
    print(f"{'added' if added else 'updated'} {wheel.filename} in {path}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    additions = load_catalog_file(Path(args.file))
    path, added = add_user_wheels(Path(args.state_dir), additions)
    print(f"imported {len(additions)} wheel(s) ({added} new) into {path}")
    return 0


"""Wheels our own source builds put in the artifact store, as catalog entries (``Catalog.with_local_wheels``).

A wheel built by ``pip wheel`` carries pip's name (``flash_attn-2.8.3.post1-cp312-cp312-linux_x86_64.whl``:
no local version tag, and its METADATA says ``Version: 2.8.3.post1``). pip refuses a file whose name's
version differs from its METADATA, so the stored file keeps pip's name. What makes it findable is its
*catalog name*: the upstream release-wheel name for the build node's torch/CUDA/ABI/Python
(``flash_attn-2.8.3.post1+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl``), computed when the
rollout is planned (``wheel_name`` in the build's params, next to its ``build_key``), with the build's
``cuda_archs`` and the builder's glibc as ``min_glibc``. The resolver then matches it by the same rules as
an upstream wheel (DESIGN §3.2 rule 4): every node with that torch/CUDA/ABI/Python, a GPU the archs
cover and glibc ≥ the builder's gets ``fa2-wheel`` with it. The install step fetches it by sha256, so the
file arrives under its pip name.

Wheels put in the store by hand (``fleetctl artifact add``) join the catalog when their file name already
follows the upstream pattern.

Only trusted provenance enters the catalog (controller/artifacts.py, docs/security.md): a build's wheel only
through its succeeded ``Build`` whose artifact was uploaded by a job of that build key (or is vouched for),
and a wheel by its upstream-style name only when vouched for (added by an operator, fetched by the
controller, imported from a bundle). A file an agent uploaded under an upstream wheel's name, or one stored
before provenance was recorded (``legacy``), never becomes an entry.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetctl.controller.artifacts import provenance_of, trusted_for
from fleetctl.controller.catalog import Catalog, default_catalog, parse_wheel_filename
from fleetctl.controller.resolver import rules
from fleetctl.controller.rollout.core import BuildStatus
from fleetctl.controller.rollout.models import Build
from fleetctl.controller.store.models import Artifact
from fleetctl.fleet.errors import CatalogError
from fleetctl.fleet.facts import NodeFacts


def catalog_wheel_name(facts: NodeFacts, version: str) -> str | None:
    """The upstream-style name of a flash-attn ``version`` wheel built on a node with these facts."""
    torch = facts.torch
    if torch is None or torch.cuda is None:
        return None
    torch_mm = rules.fmt_mm(rules.major_minor(torch.version))
    tag = rules.wheel_cuda_tag(version, torch.cuda, torch_mm)
    py = rules.major_minor(facts.python.version)
    name = (f"flash_attn-{version}+{tag}torch{torch_mm}cxx11abi{'TRUE' if torch.cxx11abi else 'FALSE'}"
            f"-cp{py[0]}{py[1]}-cp{py[0]}{py[1]}-linux_{facts.os.arch}.whl")
    try:
        parse_wheel_filename(name)
    except CatalogError:
        return None
    return name


def local_wheel_entries(s: Session) -> list[dict[str, Any]]:
    """Catalog entries for the wheels in the artifact store: succeeded source builds (by their catalog name)
    and upstream-named wheels added by hand. Newest build first."""
    stored: dict[str, str] = {sha: filename for sha, filename in s.execute(
        select(Artifact.sha256, Artifact.filename).where(Artifact.kind == "wheel"))}
    if not stored:  # read on every re-plan and verify submission: a store without wheels costs one query
        return []
    provenance = provenance_of(s, list(stored))
    out: list[dict[str, Any]] = []
    builds = s.scalars(select(Build).where(Build.status == BuildStatus.SUCCEEDED,
                                           Build.artifact_sha256.in_(list(stored)))
                       .order_by(Build.finished_at.desc()))
    for b in builds:
        params = b.params or {}
        name = params.get("wheel_name")
        if not b.artifact_sha256 or not isinstance(name, str):
            continue
        if not trusted_for(provenance.get(b.artifact_sha256, ()), b.build_key, legacy_build=True):
            continue  # not uploaded by this build's own job (nor vouched for): not this build's output
        entry: dict[str, Any] = {"filename": name, "sha256": b.artifact_sha256, "url": None,
                                 "file": stored[b.artifact_sha256], "build_key": b.build_key}
        archs = params.get("cuda_archs")
        if isinstance(archs, list) and archs and all(str(a).isdigit() for a in archs):
            entry["cuda_archs"] = [str(a) for a in archs]
        glibc = params.get("glibc")
        if isinstance(glibc, str):
            entry["min_glibc"] = glibc
        family = params.get("os_family")
        if isinstance(family, str) and family:
            entry["os_family"] = family  # libraries of the builder's OS: only nodes of that family
        out.append(entry)
    for sha, filename in stored.items():
        if not trusted_for(provenance.get(sha, ())):
            continue  # an agent's upload or unknown provenance: never chosen by its name
        try:
            parse_wheel_filename(filename)
        except CatalogError:
            continue
        out.append({"filename": filename, "sha256": sha, "url": None, "file": filename})
    return out


def controller_catalog(s: Session, state_dir: Path | None) -> Catalog:
    """The catalog every decision the controller shows or acts on uses: ``fleetctl catalog`` additions, the
    built-in upstream list and the wheels in the artifact store. One function, so the dashboard's current
    plan, the re-plan after a failed verification and a rollout never disagree about a built wheel.

    Its inputs are read on every call (the store's wheels through ``s``: another controller sharing the database
    may have stored, removed or vouched for one), and the catalog is built anew exactly when they differ from a
    recent call's (``default_catalog``, ``_with_local_wheels``): no rule to keep in step with each writer."""
    catalog, local = default_catalog(state_dir), local_wheel_entries(s)
    return _with_local_wheels(catalog, json.dumps(local, sort_keys=True)) if local else catalog


@lru_cache(maxsize=4)
def _with_local_wheels(catalog: Catalog, entries_json: str) -> Catalog:
    """``catalog`` with the store's wheels, given as their JSON (the cache key); ``catalog`` is keyed by identity,
    which ``default_catalog`` keeps for as long as the user catalog's text is the same."""
    return catalog.with_local_wheels(json.loads(entries_json))

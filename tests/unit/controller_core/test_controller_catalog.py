"""The controller's catalog is built once per set of inputs, and anew exactly when one of them changes.

``controller_catalog`` reads its inputs on every call — the user catalog file (``fleetctl catalog add`` writes it,
possibly from another process) and the artifact store's wheel entries (another controller sharing the database may
store, remove or vouch for one) — and reuses the catalog it built for the same inputs: no writer has to invalidate
anything, and no change is missed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import delete

from fleetctl.controller.artifacts import ArtifactStore, Provenance
from fleetctl.controller.catalog import Catalog, add_user_wheels, parse_catalog_text
from fleetctl.controller.local_wheels import controller_catalog
from fleetctl.controller.rollout.models import Build
from fleetctl.controller.store import Store, open_store, utcnow
from fleetctl.controller.store.models import Artifact, ArtifactProvenance

UPSTREAM_NAME = "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"  # built-in as well
USER_NAME = "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp313-cp313-linux_aarch64.whl"
BUILT_NAME = "flash_attn-2.8.3.post1+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
PIP_NAME = "flash_attn-2.8.3.post1-cp312-cp312-linux_x86_64.whl"


@pytest.fixture
def world(tmp_path: Path) -> tuple[Store, ArtifactStore, Path]:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    return store, ArtifactStore(tmp_path / "artifacts", store), tmp_path / "state"


def _catalog(store: Store, state: Path) -> Catalog:
    with store.session() as s:
        return controller_catalog(s, state)


def _origin(catalog: Catalog, filename: str) -> str | None:
    return next((w.origin for w in catalog.wheels if w.filename == filename), None)


def test_the_same_inputs_give_the_same_catalog(world: tuple[Store, ArtifactStore, Path]) -> None:
    store, arts, state = world
    first = _catalog(store, state)
    assert _catalog(store, state) is first and len(first) > 1000  # the built-in list, merged once
    arts.put_bytes(b"an upstream wheel an operator added", UPSTREAM_NAME, "wheel", provenance=Provenance.user("admin"))
    with_wheel = _catalog(store, state)
    assert with_wheel is not first and _catalog(store, state) is with_wheel


def test_a_user_catalog_edit_is_seen_at_the_next_call(world: tuple[Store, ArtifactStore, Path]) -> None:
    store, _, state = world
    before = _catalog(store, state)
    assert _origin(before, USER_NAME) is None
    add_user_wheels(state, parse_catalog_text(USER_NAME, "user", "test"))  # as `fleetctl catalog add` does
    after = _catalog(store, state)
    assert _origin(after, USER_NAME) == "user" and _catalog(store, state) is after
    (state / "catalog.json").write_text(json.dumps({"wheels": []}))  # emptied by hand
    assert _origin(_catalog(store, state), USER_NAME) is None


def test_store_wheels_join_and_leave_as_the_database_says(world: tuple[Store, ArtifactStore, Path]) -> None:
    store, arts, state = world
    # an agent's upload under an upstream name is never an entry: the catalog stays the one without it
    plain = _catalog(store, state)
    untrusted = arts.put_bytes(b"a node's upload", UPSTREAM_NAME, "wheel",
                               provenance=Provenance.build("job-x", "other|key", "node-x"))
    assert _catalog(store, state) is plain and _origin(plain, UPSTREAM_NAME) == "upstream"
    # vouched for afterwards (an operator adds the same bytes): now the store's copy wins
    arts.put_bytes(b"a node's upload", UPSTREAM_NAME, "wheel", provenance=Provenance.user("admin"))
    assert _origin(_catalog(store, state), UPSTREAM_NAME) == "artifact-store"
    # a build's wheel joins when its build succeeds, by its catalog name
    built = arts.put_bytes(b"our build's wheel", PIP_NAME, "wheel", provenance=Provenance.build("job-1", "k1", "vm"))
    assert _origin(_catalog(store, state), BUILT_NAME) is None
    with store.session() as s:
        s.add(Build(build_key="k1", status="succeeded", builder="vm", params={"wheel_name": BUILT_NAME},
                    artifact_sha256=built.sha256, artifact_filename=PIP_NAME, job_id="job-1", created_at=utcnow(),
                    finished_at=utcnow(), attempts=1))
    assert _origin(_catalog(store, state), BUILT_NAME) == "artifact-store"
    # removed through another controller of the same database: gone at the next call of this one
    other = open_store(store.url, migrate_schema=False)
    with other.session() as s:
        s.execute(delete(ArtifactProvenance).where(ArtifactProvenance.sha256.in_([untrusted.sha256, built.sha256])))
        s.execute(delete(Artifact).where(Artifact.sha256.in_([untrusted.sha256, built.sha256])))
    other.close()
    after = _catalog(store, state)
    assert _origin(after, UPSTREAM_NAME) == "upstream" and _origin(after, BUILT_NAME) is None
    assert after is plain  # the same inputs as at the start: the catalog built then

"""Issue 13: only trusted provenance enters the catalog, the plans and pip's view of the store.

A file an agent uploaded (``build``) is trusted only as its own succeeded build's wheel; one of unknown
provenance (``legacy``) for nothing; what an operator added, the controller fetched or a bundle brought
(vouched for) for anything. Every lookup by name — the catalog's local wheels, ``Upstream.stored``, the
engine's sdist, the closure's ``--find-links`` — sees only what it may trust.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fleetctl.controller.artifacts import ArtifactStore, Provenance, Source, trusted_for
from fleetctl.controller.build_uploads import BuildJob, RefusalAudit, check_upload, wheel_problem
from fleetctl.controller.jobs import JobDispatcher
from fleetctl.controller.local_wheels import local_wheel_entries
from fleetctl.controller.provisioning import InstallSet, NodeNeeds, Provisioner
from fleetctl.controller.rollout.engine import RolloutEngine
from fleetctl.controller.rollout.models import Build
from fleetctl.controller.rollout.service import RolloutRequest, plan_rollout
from fleetctl.controller.store import Store, open_store, utcnow
from fleetctl.controller.store.models import Node
from fleetctl.controller.upstream import TargetEnv, Upstream, UpstreamConfig
from fleetctl.fleet.errors import ForbiddenError, UpstreamError

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "h100" / "facts.json"
CATALOG_NAME = "flash_attn-2.8.3.post1+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
PIP_NAME = "flash_attn-2.8.3.post1-cp312-cp312-linux_x86_64.whl"
SDIST = "flash_attn-2.8.3.tar.gz"
NODE_UPLOAD = Provenance.build("job-evil", "some|other|key", "evil-node")


@pytest.fixture
def world(tmp_path: Path) -> tuple[Store, ArtifactStore]:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    now = utcnow()
    with store.session() as s:
        s.add(Node(hostname="vm", status="online", facts=json.loads(FIXTURE.read_text()), extra={}, simulated=False,
                   registered_at=now, facts_updated_at=now, last_seen=now, status_changed_at=now))
    return store, ArtifactStore(tmp_path / "artifacts", store)


def _build(store: Store, key: str, sha: str, params: dict[str, Any]) -> None:
    with store.session() as s:
        s.add(Build(build_key=key, status="succeeded", rollout_id="r-1", builder="vm", params=params,
                    artifact_sha256=sha, artifact_filename=PIP_NAME, job_id="job-1", created_at=utcnow(),
                    finished_at=utcnow(), attempts=1))


def test_node_uploaded_upstream_name_never_enters_the_catalog(world: tuple[Store, ArtifactStore]) -> None:
    store, arts = world
    poisoned = arts.put_bytes(b"poison", CATALOG_NAME, "wheel", provenance=NODE_UPLOAD)
    with store.session() as s:
        assert local_wheel_entries(s) == []
    plan = plan_rollout(store, RolloutRequest(version="2.8.3.post1")).nodes[0]
    assert plan.plan.variant == "fa2-source"  # not the poisoned "upstream" wheel
    # the operator's real copy: an entry, and what the plan uses
    real = arts.put_bytes(b"the real upstream wheel", CATALOG_NAME, "wheel", provenance=Provenance.user("admin"))
    plan = plan_rollout(store, RolloutRequest(version="2.8.3.post1")).nodes[0]
    assert plan.plan.variant == "fa2-wheel" and plan.to_json()["artifact_sha256"] == real.sha256 != poisoned.sha256


def test_build_output_enters_only_through_its_own_succeeded_build(world: tuple[Store, ArtifactStore]) -> None:
    store, arts = world
    first = plan_rollout(store, RolloutRequest(version="2.8.3.post1", canary=0, batch="1")).nodes[0]
    key = first.plan.build_key or ""
    # uploaded by a job of another build key: the Build record pointing at it is not enough
    other = arts.put_bytes(b"another key's wheel", PIP_NAME, "wheel", provenance=NODE_UPLOAD)
    _build(store, key, other.sha256, first.decision["build"])
    with store.session() as s:
        assert local_wheel_entries(s) == []
    # uploaded by this build key's job: an entry under the catalog name
    with store.session() as s:
        s.get(Build, key).artifact_sha256 = arts.put_bytes(  # type: ignore[union-attr]
            b"this key's wheel", PIP_NAME, "wheel", provenance=Provenance.build("job-1", key, "vm")).sha256
    with store.session() as s:
        (entry,) = local_wheel_entries(s)
    assert entry["filename"] == CATALOG_NAME and entry["build_key"] == key
    # a build-source file with no build record is nothing
    arts.put_bytes(b"orphan", CATALOG_NAME.replace("2.8.3.post1", "2.8.2"), "wheel",
                   provenance=Provenance.build("job-2", key, "vm"))
    with store.session() as s:
        assert len(local_wheel_entries(s)) == 1


def test_store_lookups_ignore_untrusted_files(world: tuple[Store, ArtifactStore], tmp_path: Path) -> None:
    store, arts = world
    up = Upstream(UpstreamConfig(offline=True), arts)
    sdist = arts.put_bytes(b"an sdist a node pushed", SDIST, "sdist", provenance=NODE_UPLOAD)
    wheel = arts.put_bytes(b"a dependency wheel a node pushed", "einops-0.8.0-py3-none-any.whl", "wheel",
                           provenance=NODE_UPLOAD)
    assert up.stored(SDIST) is None and up.stored("x", sdist.sha256) is None
    with pytest.raises(UpstreamError, match="not in the controller's artifact store"):
        up.sdist("flash-attn", "2.8.3")
    engine = RolloutEngine(store, JobDispatcher(store), artifacts=arts)
    assert engine._sdist(cast(Any, SimpleNamespace(version="2.8.3"))) is None
    links = tmp_path / "links"
    links.mkdir()
    up._link_store_wheels(links, [])
    assert [p.name for p in links.iterdir()] == []  # pip is never offered a node's upload
    needs = NodeNeeds("fa2-source", "2.8.3", None, None, None, TargetEnv("3.12", "x86_64", "2.39", None))
    (item,) = [i for i in Provisioner(arts, up).preflight(needs, builds=True, built=False) if i.what == "sdist"]
    assert str(item.availability) == "missing"
    # the same bytes added by an operator: now trusted everywhere, and recorded from both origins
    again = arts.put_bytes(b"an sdist a node pushed", SDIST, "sdist", provenance=Provenance.user("admin"))
    assert again.sha256 == sdist.sha256 and [p.source for p in again.sources] == [Source.USER, Source.BUILD]
    assert up.sdist("flash-attn", "2.8.3").sha256 == sdist.sha256
    assert engine._sdist(cast(Any, SimpleNamespace(version="2.8.3"))) == sdist.sha256
    arts.put_bytes(b"a dependency wheel a node pushed", wheel.filename, "wheel", provenance=Provenance.upstream(
        "https://pypi.org/simple"))
    up._link_store_wheels(links, [])
    assert [p.name for p in links.iterdir()] == [wheel.filename]


def test_plan_records_each_files_provenance(world: tuple[Store, ArtifactStore]) -> None:
    _, arts = world
    w = arts.put_bytes(b"w", CATALOG_NAME, "wheel", provenance=Provenance.upstream("https://example/w.whl"))
    (described,) = InstallSet("flash-attn", w, (), ()).describe()
    assert described["source"] == "upstream" and described["provenance"]["ref"] == "https://example/w.whl"


def test_upload_check_is_pure_and_names_why() -> None:
    now = utcnow()
    job = BuildJob("j1", "node-1", "build-from-source", "running", None,
                   {"flash_attn_version": "2.8.3", "build_key": "k"})
    ok = check_upload(job, job_id="j1", hostname="node-1", kind="wheel", now=now,
                      filename="flash_attn-2.8.3+local-cp311-cp311-linux_x86_64.whl")
    assert ok == Provenance.build("j1", "k", "node-1") and trusted_for([ok], "k") and not trusted_for([ok])
    for changes, why in (({"node": "node-2"}, "another node"), ({"kind": "install-wheel"}, "not build-from-source"),
                         ({"status": "failed"}, "is failed"), ({"status": "successful"}, "is successful")):
        with pytest.raises(ForbiddenError, match=why):
            check_upload(BuildJob(**{**job.__dict__, **changes}), job_id="j1", hostname="node-1",
                         filename="flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl", kind="wheel", now=now)
    assert wheel_problem("flash_attn_3-3.0.0b1-cp39-abi3-linux_x86_64.whl", "flash_attn_3", "3.0.0b1") is None
    assert "not a wheel" in (wheel_problem("flash_attn-2.8.3.tar.gz", "flash-attn", "2.8.3") or "")


def test_refusal_audit_coalesces_per_agent() -> None:
    rows: list[tuple[str, dict[str, Any]]] = []
    clock = [0.0]
    audit = RefusalAudit(lambda actor, target, detail: rows.append((actor, detail)), window=60, clock=lambda: clock[0])
    assert audit.refused("agent:a", "n", "why") and not audit.refused("agent:a", "n", "why")
    assert audit.refused("agent:b", "n", "why")  # another agent is not hidden behind the first
    for _ in range(100):
        audit.refused("agent:a", "n", "why")
    clock[0] = 61
    assert audit.refused("agent:a", "n", "why")
    assert [r[0] for r in rows] == ["agent:a", "agent:b", "agent:a"] and rows[-1][1]["refused_since_last_row"] == 101

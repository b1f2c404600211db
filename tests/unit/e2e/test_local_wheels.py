"""A wheel our build step put in the artifact store is chosen by the next rollout's plan (fa2-wheel).

The stored file keeps pip's own name (no local tag: pip refuses a file name whose version differs from
METADATA); the catalog knows it by the upstream-style name computed from the builder's facts
(controller/local_wheels.py), so the resolver's normal wheel rules match it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fleetctl.controller.artifacts import ArtifactStore, Provenance
from fleetctl.controller.local_wheels import catalog_wheel_name, local_wheel_entries
from fleetctl.controller.rollout.models import Build
from fleetctl.controller.rollout.service import RolloutRequest, plan_rollout
from fleetctl.controller.store import open_store, utcnow
from fleetctl.controller.store.models import Node
from fleetctl.fleet.facts import parse_node

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "h100" / "facts.json"
PIP_NAME = "flash_attn-2.8.3.post1-cp312-cp312-linux_x86_64.whl"
CATALOG_NAME = "flash_attn-2.8.3.post1+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"


def _store(tmp: Path):  # type: ignore[no-untyped-def]
    store = open_store(f"sqlite:///{tmp / 'c.db'}")
    facts = json.loads(FIXTURE.read_text())
    now = utcnow()
    with store.session() as s:
        s.add(Node(hostname="vm", status="online", facts=facts, extra={}, simulated=False, registered_at=now,
                   facts_updated_at=now, last_seen=now, status_changed_at=now))
    return store, ArtifactStore(tmp / "artifacts", store)


def test_catalog_name_of_the_h100_build() -> None:
    assert catalog_wheel_name(parse_node(json.loads(FIXTURE.read_text())), "2.8.3.post1") == CATALOG_NAME


def test_first_rollout_builds_and_records_how_to_find_the_wheel(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    plan = plan_rollout(store, RolloutRequest(version="2.8.3.post1", canary=0, batch="1"))
    (node,) = plan.nodes
    assert node.plan.variant == "fa2-source"
    build = node.decision["build"]
    assert build["wheel_name"] == CATALOG_NAME and build["glibc"] == "2.39"
    assert build["env"]["FLASH_ATTN_CUDA_ARCHS"] == "90" and build["env"]["MAX_JOBS"] == "16"


def test_second_rollout_installs_the_built_wheel(tmp_path: Path) -> None:
    store, arts = _store(tmp_path)
    first = plan_rollout(store, RolloutRequest(version="2.8.3.post1", canary=0, batch="1")).nodes[0]
    info = arts.put_bytes(b"PK\x03\x04 stand-in wheel bytes", PIP_NAME, "wheel",
                          provenance=Provenance.build("job-1", first.plan.build_key or "", "vm"))
    with store.session() as s:
        s.add(Build(build_key=first.plan.build_key, status="succeeded", rollout_id="r-1", builder="vm",
                    params=first.decision["build"], artifact_sha256=info.sha256, artifact_filename=PIP_NAME,
                    created_at=utcnow(), finished_at=utcnow(), attempts=1))
        entries = local_wheel_entries(s)
    assert entries == [{"filename": CATALOG_NAME, "sha256": info.sha256, "url": None, "file": PIP_NAME,
                        "build_key": first.plan.build_key, "cuda_archs": ["90"], "min_glibc": "2.39",
                        "os_family": "debian"}]
    second = plan_rollout(store, RolloutRequest(version="2.8.3.post1", canary=0, batch="1")).nodes[0]
    assert second.plan.variant == "fa2-wheel"
    assert second.plan.steps == ("install-wheel", "verify")
    assert second.plan.artifact == CATALOG_NAME
    assert second.to_json()["artifact_sha256"] == info.sha256  # the agent fetches it by digest: pip's file name
    assert any("artifact-store" in r for r in second.plan.reasons)


def test_wheel_without_its_build_record_or_file_is_not_offered(tmp_path: Path) -> None:
    store, arts = _store(tmp_path)
    # no build record: cannot be matched
    arts.put_bytes(b"a wheel with pip's name only", PIP_NAME, "wheel", provenance=Provenance.build("job-1", "k", "vm"))
    with store.session() as s:
        s.add(Build(build_key="k", status="succeeded", builder="vm", params={"wheel_name": CATALOG_NAME},
                    artifact_sha256="0" * 64, artifact_filename=PIP_NAME, created_at=utcnow(), attempts=1))
        assert local_wheel_entries(s) == []  # its artifact is not in the store
    assert plan_rollout(store, RolloutRequest(version="2.8.3.post1")).nodes[0].plan.variant == "fa2-source"


def test_upstream_named_wheel_added_by_hand_is_offered(tmp_path: Path) -> None:
    store, arts = _store(tmp_path)
    info = arts.put_bytes(b"an upstream-named wheel", CATALOG_NAME, "wheel", provenance=Provenance.user("admin"))
    plan = plan_rollout(store, RolloutRequest(version="2.8.3.post1")).nodes[0]
    assert plan.plan.variant == "fa2-wheel" and plan.to_json()["artifact_sha256"] == info.sha256

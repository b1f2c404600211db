"""A source-built wheel links the builder's glibc and OS libraries: the build key carries both, and the built
wheel (as the artifact store's catalog entry, controller/local_wheels.py) serves only nodes of the builder's OS
family with glibc ≥ the builder's. The case from issue 12: built on Ubuntu 20.04 (glibc 2.31), never reused on
a CentOS 7 node (glibc 2.17)."""

from __future__ import annotations

from typing import Any

from fleetctl.controller.catalog import builtin_catalog
from fleetctl.controller.resolver import Policy, resolve, rules
from fleetctl.controller.rollout.core import NodePlan, group_builds
from tests.unit.resolver.nodes import node
from tests.unit.resolver.test_resolve_table import H100_CU130

UBUNTU_2004 = {"id": "ubuntu", "version_id": "20.04", "arch": "x86_64", "kernel": "5.4.0", "glibc": "2.31"}
UBUNTU_2204 = {"id": "ubuntu", "version_id": "22.04", "arch": "x86_64", "kernel": "5.15.0", "glibc": "2.35"}
CENTOS_7 = {"id": "centos", "version_id": "7", "arch": "x86_64", "kernel": "3.10.0", "glibc": "2.17"}
ROCKY_9 = {"id": "rocky", "version_id": "9.4", "arch": "x86_64", "kernel": "5.14.0", "glibc": "2.34"}


def h100(host: str, os_: dict[str, Any]) -> Any:
    return node(hostname=host, os=os_, **H100_CU130)


def test_os_family() -> None:
    assert [rules.os_family(i) for i in ("ubuntu", "debian", "centos", "rocky", "RHEL", "arch", "")] == \
        ["debian", "debian", "rhel", "rhel", "rhel", "arch", "unknown"]


def test_builder_glibc_and_os_family_are_in_the_build_key() -> None:
    plans = {h: resolve(h100(h, os_), builtin_catalog(), Policy())
             for h, os_ in (("u2004", UBUNTU_2004), ("c7", CENTOS_7), ("u2004-b", UBUNTU_2004))}
    keys = {h: d.build.build_key for h, d in plans.items() if d.build is not None}
    assert len(keys) == 3 and all(d.variant == "fa2-source" for d in plans.values())
    assert ";os=debian;glibc=2.31;" in keys["u2004"] and ";os=rhel;glibc=2.17;" in keys["c7"]
    assert keys["u2004"] == keys["u2004-b"] != keys["c7"]
    build = plans["u2004"].build
    assert build is not None and (build.os_family, build.glibc) == ("debian", "2.31")
    # the rollout planner builds once per key: the CentOS node gets its own build, not the Ubuntu wheel
    node_plans = [NodePlan(h, "fa2-source", ("build-from-source",), build_key=keys[h]) for h in keys]
    assert group_builds(node_plans, [list(keys)]) == {keys["u2004"]: "u2004", keys["c7"]: "c7"}


def test_a_wheel_built_on_glibc_2_31_serves_only_newer_glibc_of_the_same_family() -> None:
    builder = resolve(h100("builder", UBUNTU_2004), builtin_catalog(), Policy())
    assert builder.build is not None and builder.flash_attn_version
    version = builder.flash_attn_version
    # what controller/local_wheels.py makes of the succeeded build: catalog name, min_glibc and os_family
    name = f"flash_attn-{version}+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    catalog = builtin_catalog().with_local_wheels([{
        "filename": name, "sha256": "a" * 64, "url": None, "cuda_archs": ["90"],
        "min_glibc": builder.build.glibc, "os_family": builder.build.os_family}])

    same = resolve(h100("u2004", UBUNTU_2004), catalog, Policy())
    newer = resolve(h100("u2204", UBUNTU_2204), catalog, Policy())
    assert (same.variant, same.artifact) == (newer.variant, newer.artifact) == ("fa2-wheel", name)

    centos7 = resolve(h100("c7", CENTOS_7), catalog, Policy())
    assert centos7.variant == "fa2-source" and centos7.artifact is None
    assert any(f"{name} needs glibc ≥ 2.31, the node has 2.17" in r.reason for r in centos7.rejected), \
        centos7.rejected
    rocky = resolve(h100("r9", ROCKY_9), catalog, Policy())  # glibc 2.34 ≥ 2.31, but another OS family
    assert rocky.variant == "fa2-source"
    assert any("was built on debian, the node's OS family is rhel" in r.reason for r in rocky.rejected), rocky.rejected

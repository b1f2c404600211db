"""Simulation profiles: every one parses under the §3.1 contract, round-trips, and is flagged simulated."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from fleetctl.agent.profiles import list_profiles, load_profile
from fleetctl.fleet.errors import NotFoundError
from fleetctl.fleet.facts import parse_node, version_tuple

REQUIRED = {"a100", "h100", "h200", "gh200", "l4", "l40s", "a10", "rtx3090", "rtx4090", "rtx5090", "b200", "t4",
            "v100", "apt-nopubkey", "no-toolkit", "toolkit-newer-than-driver", "old-glibc-ubuntu2004",
            "old-glibc-centos7", "cpu-only-torch", "torch-cuda-above-driver", "flash-attn-installed"}


def test_catalog_is_complete() -> None:
    assert set(list_profiles()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_parses_and_round_trips(name: str) -> None:
    facts = load_profile(name)
    assert facts.hostname == f"sim-{name}"
    assert facts.extra["simulated"] is True and facts.extra["profile"] == name
    assert facts.extra["description"]
    again = parse_node(json.loads(json.dumps(facts.to_json())))
    assert again == facts
    assert set(facts.to_json()) == {"hostname", "os", "driver", "gpus", "toolkit", "python", "torch", "flash_attn",
                                    "resources", "apt"}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_is_plausible(name: str) -> None:
    facts = load_profile(name)
    assert facts.driver is not None and facts.gpus
    assert len({g.uuid for g in facts.gpus}) == len(facts.gpus)
    if facts.torch is not None and facts.torch.cuda is not None:
        local = facts.torch.version.split("+")[1]
        assert local == "cu" + facts.torch.cuda.replace(".", ""), "torch's local tag matches torch.version.cuda"
        assert facts.torch.arch_list
    if facts.torch is not None:
        assert facts.torch.cxx11abi == (version_tuple(facts.torch.version) >= (2, 7))  # pip wheels flipped at 2.7
    if name != "torch-cuda-above-driver" and facts.torch is not None and facts.torch.cuda is not None:
        assert version_tuple(facts.torch.cuda)[0] <= version_tuple(facts.driver.cuda_max)[0]


def test_problem_profiles_show_their_problem() -> None:
    apt = load_profile("apt-nopubkey").apt
    assert apt is not None and any("NO_PUBKEY" in line for line in apt.errors)
    assert load_profile("no-toolkit").toolkit is None
    newer = load_profile("toolkit-newer-than-driver")
    assert newer.toolkit is not None and newer.driver is not None
    assert version_tuple(newer.toolkit.nvcc) > version_tuple(newer.driver.cuda_max)
    assert load_profile("old-glibc-centos7").os.glibc == "2.17"
    assert load_profile("old-glibc-ubuntu2004").os.glibc == "2.31"
    cpu = load_profile("cpu-only-torch").torch
    assert cpu is not None and cpu.cuda is None and cpu.arch_list == ()
    above = load_profile("torch-cuda-above-driver")
    assert above.torch is not None and above.torch.cuda is not None and above.driver is not None
    assert version_tuple(above.torch.cuda)[0] > version_tuple(above.driver.cuda_max)[0]
    installed = load_profile("flash-attn-installed").flash_attn
    assert installed is not None and installed.variant == "fa2"
    assert load_profile("gh200").os.arch == "aarch64"


def test_hostname_override() -> None:
    assert load_profile("h100", hostname="gpu-h100-17").hostname == "gpu-h100-17"


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(NotFoundError) as info:
        load_profile("h9000")
    assert info.value.hint is not None and "h100" in info.value.hint and "t4" in info.value.hint
    with pytest.raises(NotFoundError):
        load_profile("../fleet/facts")


def test_profiles_are_package_data() -> None:
    root = resources.files("fleetctl.agent.profiles")
    assert all(root.joinpath(f"{name}.json").is_file() for name in REQUIRED)


def test_docs_table_lists_every_profile() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "profiles.md").read_text(encoding="utf-8")
    for name in list_profiles():
        assert f"`{name}`" in doc, name

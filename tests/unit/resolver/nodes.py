"""Node facts builders for resolver tests: a healthy base node plus dotted-path overrides."""

from __future__ import annotations

import copy
from typing import Any

from fleetctl.fleet.facts import NodeFacts, parse_node

BASE: dict[str, Any] = {
    "hostname": "node-1",
    "os": {"id": "ubuntu", "version_id": "22.04", "arch": "x86_64", "kernel": "5.15.0", "glibc": "2.35"},
    "driver": {"version": "550.54.15", "cuda_max": "12.4"},
    "gpus": [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "memory_mib": 81920,
              "uuid": "GPU-0"}],
    "toolkit": None,
    "python": {"version": "3.11.9", "executable": "/venv/bin/python"},
    "torch": {"version": "2.7.1+cu126", "cuda": "12.6", "cxx11abi": True,
              "arch_list": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]},
    "flash_attn": None,
    "resources": {"cpu_cores": 32, "memory_mib": 262144},
    "apt": None,
}

GPU = {
    "T4": ("Tesla T4", "7.5"), "V100": ("Tesla V100", "7.0"), "P100": ("Tesla P100", "6.0"),
    "A100": ("NVIDIA A100", "8.0"), "A10": ("NVIDIA A10", "8.6"), "L4": ("NVIDIA L4", "8.9"),
    "H100": ("NVIDIA H100 80GB HBM3", "9.0"), "B200": ("NVIDIA B200", "10.0"),
    "RTX5090": ("NVIDIA GeForce RTX 5090", "12.0"), "GB10": ("NVIDIA GB10", "12.1"), "Thor": ("NVIDIA Thor", "11.0"),
    "Orin": ("NVIDIA Orin", "8.7"),
}


def node_dict(**overrides: Any) -> dict[str, Any]:
    """BASE with overrides; keys use '__' for nesting (torch__cuda="13.0"); gpu="H100" sets one GPU."""
    obj = copy.deepcopy(BASE)
    gpus = overrides.pop("gpu", None)
    if gpus is not None:
        names = gpus if isinstance(gpus, list) else [gpus]
        obj["gpus"] = [{"index": i, "name": GPU[g][0], "compute_capability": GPU[g][1], "memory_mib": 16384,
                        "uuid": f"GPU-{i}"} for i, g in enumerate(names)]
    for key, value in overrides.items():
        path = key.split("__")
        target = obj
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return obj


def node(**overrides: Any) -> NodeFacts:
    return parse_node(node_dict(**overrides))

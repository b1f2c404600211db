"""Issue 19: a ROCm node's source build through the same build-from-source playbook as a CUDA node's.

The MI300X profile (and the RX 7900 XTX variant of it) is planned by the real resolver; the rollout engine's
mapping (``build_target_vars`` + ``checked_job_vars``) turns its build into job variables; the agent's own runner
(``make_runner``, connection ``local``) runs the real playbook through ansible-runner against a real venv holding a
stand-in ROCm torch (``torch.version.hip`` set, ``torch.version.cuda`` None). The stand-in sdist's backend records
what the build saw: the Composable Kernel build gets ``BUILD_TARGET=rocm GPU_ARCHS=gfx942``, the Triton AMD build
``FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE``, neither any CUDA variable; the built wheel is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.commands import run as agent_run
from fleetctl.controller.catalog import builtin_catalog
from fleetctl.controller.resolver import Policy, resolve
from fleetctl.controller.rollout.jobvars import build_target_vars, checked_job_vars
from fleetctl.fleet.facts import parse_node
from fleetctl.fleet.jobs import JobSpec
from tests.integration.harness import upstream, wheels
from tests.unit.resolver.test_platforms import profile

HIP = "6.2.41133-dd7f95766"
RDNA3 = [{"index": 0, "name": "AMD Radeon RX 7900 XTX", "compute_capability": "11.0", "memory_mib": 24560,
          "uuid": "u0", "vendor": "amd", "arch": "gfx1100"}]


def _ansible() -> bool:
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return shutil.which("ansible-playbook", path=path) is not None


pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(not _ansible(), reason="ansible-playbook not installed")]


class StoreClient:
    """The agent's artifact client, keeping what the agent uploads (the built wheel) by sha256."""

    def __init__(self) -> None:
        self.uploaded: dict[str, bytes] = {}

    async def fetch_artifact(self, sha256: str, dest_dir: Path) -> Path:
        raise AssertionError("the sdist is passed by path: nothing to fetch")

    async def upload_artifact(self, path: Path, kind: str = "other", **_: Any) -> str:
        sha = wheels.sha256_file(path)
        self.uploaded[sha] = path.read_bytes()
        return sha


def agent_runner(tmp_path: Path) -> tuple[Any, StoreClient]:
    """The agent's own job runner as ``fleet-agent run`` makes it (connection local), with a store client."""
    parser = argparse.ArgumentParser()
    agent_run.register(parser.add_subparsers())
    args = parser.parse_args(["run", "--controller", "127.0.0.1:1", "--state-dir", str(tmp_path / "agent"),
                              "--node-state-dir", str(tmp_path / "node"), "--ansible-python", sys.executable])
    agent_run.absolute_paths(args)
    runner, store = agent_run.make_runner(args), StoreClient()
    runner.client = store  # type: ignore[attr-defined]  # ArtifactJobRunner; bind() does this in the agent
    return runner, store


def rocm_job_vars(facts: dict[str, Any]) -> dict[str, Any]:
    """The build job's target variables as the engine sends them, from the real plan of ``facts``."""
    d = resolve(parse_node(facts), builtin_catalog(), Policy())
    assert d.variant == "fa2-source" and d.build is not None, d.reasons
    build = d.build.to_json()
    return checked_job_vars({"max_jobs": 2, "nvcc_threads": build["nvcc_threads"], **build_target_vars(build)})


@pytest.fixture(scope="module")
def rocm_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real venv (with pip, which the playbook's ``pip wheel`` runs) holding the stand-in ROCm torch."""
    root = tmp_path_factory.mktemp("rocm")
    subprocess.run([sys.executable, "-m", "venv", str(root / "target")], check=True, capture_output=True)
    python = root / "target" / "bin" / "python"
    torch = upstream.torch_wheel(root / "wheels", "2.5.1+rocm6.2", hip=HIP)
    done = upstream.run_pip("install", "--no-index", "--no-deps", torch, python=python)
    assert done.returncode == 0, done.stderr
    return python


@pytest.mark.parametrize(("gpus", "backend", "expected"), [
    (None, "rocm-ck", {"BUILD_TARGET": "rocm", "GPU_ARCHS": "gfx942", "FLASH_ATTENTION_TRITON_AMD_ENABLE": None}),
    (RDNA3, "rocm-triton", {"BUILD_TARGET": "rocm", "GPU_ARCHS": None, "FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"}),
], ids=["mi300x-ck", "rx7900-triton"])
async def test_rocm_build_reaches_setup_and_installs(rocm_venv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     gpus: list[dict[str, Any]] | None, backend: str,
                                                     expected: dict[str, str | None]) -> None:
    monkeypatch.chdir(tmp_path)
    variables = rocm_job_vars(profile("mi300x", **({"gpus": gpus} if gpus else {})))
    assert variables["gpu_backend"] == backend and "cuda_archs" not in variables
    sdist = wheels.build_sdist(tmp_path / "sdist", "flash_attn", "2.8.3")
    runner, store = agent_runner(tmp_path)
    job = JobSpec("build-1", "build-from-source", {**variables, "sdist_path": str(sdist), "python": str(rocm_venv),
                                                   "sdist_sha256": wheels.sha256_file(sdist), "install": True},
                  timeout_s=240)
    out = await runner.run(job, lambda e: None)
    assert out.status == "successful", out.error

    built = out.result["built_wheel"]
    assert built["filename"] == "flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl"
    assert (built["gpu_backend"], built["cuda_archs"]) == (backend, "")
    assert out.result["install_wheel"]["sha256"] == built["sha256"] and built["sha256"] in store.uploaded
    seen = json.loads(subprocess.run(
        [str(rocm_venv), "-c", "import importlib.resources as r, flash_attn; assert flash_attn.BUILT_FROM_SOURCE; "
         "print(r.files('flash_attn').joinpath('_build_env.json').read_text())"],
        capture_output=True, text=True, check=True).stdout)
    assert {k: seen[k] for k in expected} == expected
    assert (seen["torch_hip"], seen["torch_cuda"]) == (HIP, None)  # built against the ROCm torch
    assert seen["FLASH_ATTN_CUDA_ARCHS"] is None and seen["CUDA_HOME"] is None and seen["NVCC_THREADS"] is None
    assert seen["ROCM_HOME"] == "/opt/rocm" and seen["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"


async def test_rocm_build_refuses_cuda_archs_and_a_bad_gfx_list(rocm_venv: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wrong combination is refused by the assert naming its variable, before anything is copied."""
    monkeypatch.chdir(tmp_path)
    sdist = wheels.build_sdist(tmp_path / "sdist", "flash_attn", "2.8.3")
    runner, _ = agent_runner(tmp_path)
    base = {"sdist_path": str(sdist), "sdist_sha256": wheels.sha256_file(sdist), "python": str(rocm_venv)}
    cases = [({"gpu_backend": "rocm-ck", "gpu_archs": "gfx942", "cuda_archs": "90"},
              "variable cuda_archs must list CUDA architectures like 80;90 (FLASH_ATTN_CUDA_ARCHS) for gpu_backend "
              "cuda and be unset for a ROCm build"),
             ({"gpu_backend": "rocm-ck", "gpu_archs": "sm_90"}, "variable gpu_archs must list gfx targets"),
             ({"gpu_backend": "rocm-ck"}, "variable gpu_archs must list gfx targets"),
             ({"gpu_backend": "hip"}, "variable gpu_backend must be cuda, rocm-ck"),
             ({"cuda_archs": "90", "gpu_archs": "gfx942"}, "variable gpu_archs must list gfx targets")]
    for n, (extra, message) in enumerate(cases):
        out = await runner.run(JobSpec(f"bad-{n}", "build-from-source", {**base, **extra}, timeout_s=120),
                               lambda e: None)
        assert out.status == "failed" and out.error and message in out.error, (extra, out.error)
    assert not (tmp_path / "node" / "build").exists()  # refused before the build directory was made

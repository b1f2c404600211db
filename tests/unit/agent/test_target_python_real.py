"""The target-python probe through real interpreters: a throwaway venv without torch, and one with a fake torch."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from fleetctl.agent.probes import Probes, collect_facts
from fleetctl.agent.probes.target_python import TargetPythonProbe
from fleetctl.fleet.facts import parse_node

FAKE_TORCH = '''
__version__ = "2.11.0+cu130"


class version:
    cuda = "13.0"
    hip = None


class _C:
    _GLIBCXX_USE_CXX11_ABI = True

    @staticmethod
    def _cuda_getArchFlags():
        return "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 compute_120"


class cuda:
    @staticmethod
    def get_arch_list():
        return {arch_list!r}

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0


print("torch noise on stdout while importing")
'''


def _make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True, timeout=60)
    return Path(out.stdout.strip())


def _install_fake_torch(python: Path, arch_list: list[str]) -> None:
    site = _site_packages(python)
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(FAKE_TORCH.format(arch_list=arch_list))


def _install_dist(python: Path, name: str, version: str) -> None:
    info = _site_packages(python) / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_venv(tmp_path_factory.mktemp("bare") / "venv")


def test_venv_without_torch(bare_venv: Path) -> None:
    result = TargetPythonProbe().probe(str(bare_venv))
    assert result.torch is None and result.flash_attn is None
    assert result.python.executable == str(bare_venv)
    assert result.python.version == sysconfig.get_python_version() + "." + str(sys.version_info[2])
    assert any("No module named 'torch'" in e for e in result.errors)


def test_venv_with_fake_torch_and_flash_attn(tmp_path: Path) -> None:
    python = _make_venv(tmp_path / "venv")
    _install_fake_torch(python, ["sm_80", "sm_90", "sm_100"])
    _install_dist(python, "flash_attn", "2.8.3")
    result = TargetPythonProbe().probe(str(python))
    assert result.torch is not None
    assert (result.torch.version, result.torch.cuda, result.torch.cxx11abi) == ("2.11.0+cu130", "13.0", True)
    assert result.torch.arch_list == ("sm_80", "sm_90", "sm_100")
    assert result.flash_attn is not None
    assert (result.flash_attn.version, result.flash_attn.variant) == ("2.8.3", "fa2")
    assert result.errors == ()
    assert result.extra["torch_cuda_available"] is False


def test_fake_torch_without_gpu_falls_back_to_arch_flags(tmp_path: Path) -> None:
    python = _make_venv(tmp_path / "venv")
    _install_fake_torch(python, [])  # what get_arch_list() returns on a machine without a GPU
    _install_dist(python, "flash-attn-4", "4.0.0b27")
    result = TargetPythonProbe().probe(str(python))
    assert result.torch is not None
    assert result.torch.arch_list == ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
    assert result.flash_attn is not None and result.flash_attn.variant == "fa4"


def test_broken_torch_is_a_fact(tmp_path: Path) -> None:
    python = _make_venv(tmp_path / "venv")
    site = _site_packages(python)
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(textwrap.dedent('''
        raise OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")
    '''))
    result = TargetPythonProbe().probe(str(python))
    assert result.torch is None
    assert any("libcudnn.so.9" in e for e in result.errors)


def test_collect_facts_through_a_real_interpreter(bare_venv: Path) -> None:
    facts = collect_facts(str(bare_venv), hostname="test-node", probes=Probes())
    assert facts.python.executable == str(bare_venv) and facts.torch is None
    assert facts.extra["target_python"] == str(bare_venv)
    assert parse_node(json.loads(json.dumps(facts.to_json()))) == facts

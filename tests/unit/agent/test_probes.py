"""Each probe against real recorded outputs; every failure mode becomes a fact with its reason."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from fleetctl.agent.probes import Probes, collect_facts
from fleetctl.agent.probes.apt import AptProbe, apt_error_lines
from fleetctl.agent.probes.nvcc import NvccProbe, parse_nvcc_version
from fleetctl.agent.probes.nvml import NvmlProbe, cuda_version_text
from fleetctl.agent.probes.os_info import OsProbe, parse_glibc, parse_meminfo_mib, parse_os_release
from fleetctl.agent.probes.system import CommandNotFound, CommandTimeout, FileUnreadable, ProbeError
from fleetctl.agent.probes.target_python import TargetPythonProbe, default_target_python, parse_probe_output
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.facts import FlashAttnFacts, parse_node
from tests.unit.agent.conftest import ScriptedRunner, fixture_text, ok

# ---------------------------------------------------------------- nvcc


def test_parse_nvcc_real_outputs() -> None:
    v13 = parse_nvcc_version(fixture_text("nvcc_13.0.txt"))
    assert v13 is not None
    assert (v13.release, v13.full) == ("13.0", "13.0.88")
    assert v13.build is not None and v13.build.startswith("cuda_13.0.r13.0/compiler.")
    v12 = parse_nvcc_version(fixture_text("nvcc_12.4.txt"))
    assert v12 is not None and (v12.release, v12.full) == ("12.4", "12.4.131")
    v11 = parse_nvcc_version(fixture_text("nvcc_11.8.txt"))
    assert v11 is not None and (v11.release, v11.full) == ("11.8", "11.8.89")
    assert parse_nvcc_version("bash: nvcc: command not found") is None
    only_build = parse_nvcc_version("Build cuda_12.1.r12.1/compiler.32688072_0\n")
    assert only_build is not None and only_build.release == "12.1"


def _nvcc_probe(runner: ScriptedRunner, *, on_path: str | None, env: dict[str, str],
                installed: list[str], links: dict[str, str] | None = None) -> NvccProbe:
    links = links or {}
    return NvccProbe(runner, env=env, which=lambda name, path: on_path,
                     glob_paths=lambda pattern: sorted(p for p in installed if p.startswith("/usr/local/cuda-")),
                     is_executable=lambda p: p in installed or p == on_path,
                     realpath=lambda p: links.get(p, p))


def test_nvcc_every_toolkit_and_the_active_one() -> None:
    runner = ScriptedRunner({
        ("/opt/cuda-12.4/bin/nvcc", "-V"): ok([], fixture_text("nvcc_12.4.txt")),
        ("/usr/local/cuda/bin/nvcc", "-V"): ok([], fixture_text("nvcc_13.0.txt")),
        ("/usr/local/cuda-11.8/bin/nvcc", "-V"): ok([], fixture_text("nvcc_11.8.txt")),
    })
    installed = ["/opt/cuda-12.4/bin/nvcc", "/usr/local/cuda/bin/nvcc", "/usr/local/cuda-11.8/bin/nvcc",
                 "/usr/local/cuda-13.0/bin/nvcc"]
    probe = _nvcc_probe(runner, on_path=None, env={"CUDA_HOME": "/opt/cuda-12.4", "PATH": "/usr/bin"},
                        installed=installed,
                        links={"/usr/local/cuda/bin/nvcc": "/usr/local/cuda-13.0/bin/nvcc",
                               "/usr/local/cuda-13.0/bin/nvcc": "/usr/local/cuda-13.0/bin/nvcc"})
    result = probe.probe()
    # CUDA_HOME beats /usr/local/cuda when nvcc is not on PATH; the cuda-13.0 symlink target is not listed twice.
    assert result.active is not None
    assert (result.active.nvcc, result.active.path) == ("12.4", "/opt/cuda-12.4/bin/nvcc")
    assert [(t.nvcc, t.path, t.active) for t in result.toolkits] == [
        ("12.4", "/opt/cuda-12.4/bin/nvcc", True),
        ("13.0", "/usr/local/cuda/bin/nvcc", False),
        ("11.8", "/usr/local/cuda-11.8/bin/nvcc", False),
    ]
    assert result.errors == ()


def test_nvcc_on_path_wins() -> None:
    runner = ScriptedRunner(lambda argv: ok(argv, fixture_text("nvcc_13.0.txt") if "13" in argv[0]
                                            else fixture_text("nvcc_12.4.txt")))
    probe = _nvcc_probe(runner, on_path="/usr/local/cuda-12.4/bin/nvcc", env={"CUDA_HOME": "/usr/local/cuda-13.0"},
                        installed=["/usr/local/cuda-12.4/bin/nvcc", "/usr/local/cuda-13.0/bin/nvcc"])
    result = probe.probe()
    assert result.active is not None and result.active.nvcc == "12.4"
    assert [t.active for t in result.toolkits] == [True, False]


def test_nvcc_none_found_is_a_fact() -> None:
    result = _nvcc_probe(ScriptedRunner({}), on_path=None, env={}, installed=[]).probe()
    assert result.active is None and result.toolkits == ()
    assert result.errors == ("nvcc: no CUDA toolkit found (PATH, $CUDA_HOME, /usr/local/cuda*)",)


def test_nvcc_broken_binary_is_a_fact() -> None:
    runner = ScriptedRunner({
        ("/usr/local/cuda/bin/nvcc", "-V"): ok([], "", "nvcc: error while loading shared libraries: libnvvm.so", 127),
        ("/usr/local/cuda-12.4/bin/nvcc", "-V"): CommandTimeout("nvcc -V: no answer within 20 s"),
    })
    result = _nvcc_probe(runner, on_path=None, env={},
                         installed=["/usr/local/cuda/bin/nvcc", "/usr/local/cuda-12.4/bin/nvcc"]).probe()
    assert result.active is None
    assert "exit 127" in result.errors[0] and "libnvvm" in result.errors[0]
    assert "no answer" in result.errors[1]


def test_nvcc_real_on_this_machine() -> None:
    """Whatever this machine has, the real probe answers without raising."""
    result = NvccProbe().probe()
    assert (result.active is None) == (result.toolkits == ())


# ---------------------------------------------------------------- NVML


class _NVMLError(Exception):
    pass


class NVMLError_DriverNotLoaded(_NVMLError):  # pynvml's class name
    def __str__(self) -> str:
        return "Driver Not Loaded"


class NVMLError_GpuIsLost(_NVMLError):
    def __str__(self) -> str:
        return "GPU is lost"


class FakeNvml:
    """The slice of pynvml the probe uses, answering like an H100 node (driver 580.159.04, CUDA 13.0)."""

    def __init__(self, gpus: int = 2, fail_init: Exception | None = None, lost: set[int] | None = None) -> None:
        self.gpus = gpus
        self.fail_init = fail_init
        self.lost = lost or set()
        self.shutdown = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.fail_init

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.159.04"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return 13000

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.lost:
            raise NVMLError_GpuIsLost()
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"  # old pynvml returned bytes

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return (9, 0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(total=85520809984, free=0, used=0)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-393f97ea-669f-35b1-1432-3240df7b964{handle}"


def test_cuda_version_encoding() -> None:
    assert cuda_version_text(13000) == "13.0"
    assert cuda_version_text(12040) == "12.4"
    assert cuda_version_text(12080) == "12.8"


def test_nvml_reads_driver_and_gpus() -> None:
    fake = FakeNvml(gpus=2)
    result = NvmlProbe(loader=lambda: fake).probe()
    assert result.driver is not None
    assert (result.driver.version, result.driver.cuda_max) == ("580.159.04", "13.0")
    assert [(g.index, g.name, g.compute_capability, g.memory_mib) for g in result.gpus] == [
        (0, "NVIDIA H100 80GB HBM3", "9.0", 81559), (1, "NVIDIA H100 80GB HBM3", "9.0", 81559)]
    assert result.gpus[1].uuid.startswith("GPU-")
    assert result.errors == () and fake.shutdown


def test_nvml_driver_not_loaded_is_a_fact() -> None:
    result = NvmlProbe(loader=lambda: FakeNvml(fail_init=NVMLError_DriverNotLoaded())).probe()
    assert result.driver is None and result.gpus == ()
    assert result.errors == ("NVML: driver not loaded",)


def test_nvml_missing_library_is_a_fact() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    result = NvmlProbe(loader=missing).probe()
    assert result.driver is None and result.gpus == ()
    assert result.errors[0].startswith("NVML: nvidia-ml-py is not installed")


def test_nvml_lost_gpu_keeps_the_others() -> None:
    result = NvmlProbe(loader=lambda: FakeNvml(gpus=3, lost={1})).probe()
    assert [g.index for g in result.gpus] == [0, 2]
    assert result.errors == ("NVML: GPU 1: GPU is lost (fell off the bus)",)


def test_nvml_real_pynvml_on_this_machine() -> None:
    """The real nvidia-ml-py: with no NVIDIA driver here it must report, not raise."""
    result = NvmlProbe().probe()
    if result.driver is None:
        assert result.gpus == () and result.errors and result.errors[0].startswith("NVML: ")


# ---------------------------------------------------------------- OS


def _reader(files: dict[str, str]) -> Any:
    def read(path: str) -> str:
        if path not in files:
            raise FileUnreadable(f"{path}: No such file or directory")
        return files[path]
    return read


def test_os_release_real_files() -> None:
    assert parse_os_release(fixture_text("os-release.ubuntu2204"))["VERSION_ID"] == "22.04"
    centos = parse_os_release(fixture_text("os-release.centos7"))
    assert (centos["ID"], centos["VERSION_ID"]) == ("centos", "7")
    assert parse_os_release(fixture_text("os-release.debian12"))["ID"] == "debian"


def test_glibc_and_meminfo_parsers() -> None:
    assert parse_glibc("glibc 2.36") == "2.36"
    assert parse_glibc(fixture_text("ldd_ubuntu2204.txt")) == "2.35"
    assert parse_glibc(fixture_text("ldd_debian12.txt")) == "2.36"
    assert parse_glibc("musl libc (x86_64)\nVersion 1.2.4") is None
    assert parse_meminfo_mib(fixture_text("meminfo.txt")) == 128804


def test_os_probe_from_recorded_files() -> None:
    probe = OsProbe(ScriptedRunner({}), _reader({"/etc/os-release": fixture_text("os-release.ubuntu2204"),
                                                 "/proc/meminfo": fixture_text("meminfo.txt")}),
                    machine=lambda: "x86_64", kernel=lambda: "5.15.0-122-generic",
                    confstr_glibc=lambda: "glibc 2.35", cpu_cores=lambda: 16)
    result = probe.probe()
    assert (result.os.id, result.os.version_id, result.os.arch, result.os.kernel, result.os.glibc) == (
        "ubuntu", "22.04", "x86_64", "5.15.0-122-generic", "2.35")
    assert (result.resources.cpu_cores, result.resources.memory_mib) == (16, 128804)
    assert result.errors == ()


def test_os_probe_glibc_from_ldd_and_arm64_alias() -> None:
    runner = ScriptedRunner({("ldd", "--version"): ok([], fixture_text("ldd_ubuntu2204.txt"))})
    probe = OsProbe(runner, _reader({"/usr/lib/os-release": fixture_text("os-release.arch")}),
                    machine=lambda: "arm64", kernel=lambda: "6.8.0", confstr_glibc=lambda: None, cpu_cores=lambda: 4)
    result = probe.probe()
    assert result.os.arch == "aarch64" and result.os.glibc == "2.35"
    assert (result.os.id, result.os.version_id) == ("arch", "rolling")
    assert any("VERSION_ID" in e for e in result.errors)
    assert any("/proc/meminfo" in e for e in result.errors)  # fell back to sysconf
    assert result.resources.memory_mib >= 1


def test_os_probe_no_glibc_is_a_fact() -> None:
    runner = ScriptedRunner({("ldd", "--version"): CommandNotFound("ldd: not found")})
    probe = OsProbe(runner, _reader({}), machine=lambda: "x86_64", kernel=lambda: "6.1",
                    confstr_glibc=lambda: None, cpu_cores=lambda: 2)
    result = probe.probe()
    assert result.os.glibc is None and result.os.id == "unknown"
    assert any("glibc version unknown" in e for e in result.errors)


def test_os_probe_unsupported_arch_is_a_clear_error() -> None:
    probe = OsProbe(ScriptedRunner({}), _reader({}), machine=lambda: "ppc64le", confstr_glibc=lambda: "glibc 2.34")
    with pytest.raises(UsageError, match="ppc64le"):
        probe.probe()


def test_os_probe_real() -> None:
    result = OsProbe().probe()
    assert result.os.arch in ("x86_64", "aarch64") and result.resources.cpu_cores >= 1


# ---------------------------------------------------------------- apt


def test_apt_nopubkey_lines_from_real_output() -> None:
    stdout, stderr = fixture_text("apt_update_nopubkey.stdout"), fixture_text("apt_update_nopubkey.stderr")
    runner = ScriptedRunner({("apt-get", "update"): ok([], stdout, stderr, 100)})
    result = AptProbe(runner).probe()
    assert result.apt is not None
    assert len(result.apt.errors) == 2
    assert result.apt.errors[0].startswith("W: GPG error:") and "NO_PUBKEY A4B469963BF863CC" in result.apt.errors[0]
    assert result.apt.errors[1].startswith("E: The repository") and result.apt.errors[1].endswith("is not signed.")
    env = runner.calls[0][2]
    assert env is not None and env["LC_ALL"] == "C"


def test_apt_root_and_options_build_the_chroot_command() -> None:
    runner = ScriptedRunner({
        ("chroot", "/srv/sim/n1", "apt-get", "update", "-o", "Dir::Etc::sourcelist=/tmp/s.list"): ok([], "Hit:1 x\n"),
    })
    result = AptProbe(runner).probe(root="/srv/sim/n1", options=["Dir::Etc::sourcelist=/tmp/s.list"])
    assert result.apt is not None and result.apt.errors == () and result.errors == ()


def test_apt_failures_are_facts() -> None:
    missing = AptProbe(ScriptedRunner({("apt-get", "update"): CommandNotFound("apt-get: not found")})).probe()
    assert missing.apt is None and missing.errors == ("apt: apt-get: not found",)
    slow = AptProbe(ScriptedRunner({("apt-get", "update"): CommandTimeout("hung")}), timeout=5).probe()
    assert slow.apt is not None and slow.apt.errors == ("E: apt-get update timed out after 5 s",)
    lock = AptProbe(ScriptedRunner({("apt-get", "update"): ok(
        [], "", "Reading package lists...\nsegfault", 139)})).probe()
    assert lock.apt is not None and lock.apt.errors == ("E: apt-get update exited 139: segfault",)
    assert apt_error_lines("W: a\nW: a\nN: b\nE: c\n") == ["W: a", "E: c"]


# ---------------------------------------------------------------- target python (parse path)


def test_parse_probe_output_h100() -> None:
    result = parse_probe_output(fixture_text("probe_h100_torch211.json"), interpreter="/opt/torch/.venv/bin/python3")
    assert result.python.version == "3.12.3"
    assert result.torch is not None
    assert (result.torch.version, result.torch.cuda, result.torch.cxx11abi) == ("2.11.0+cu130", "13.0", True)
    assert "sm_90" in result.torch.arch_list and "compute_120" in result.torch.arch_list
    assert result.flash_attn is None and result.errors == ()


def test_parse_probe_output_cpu_only_torch() -> None:
    result = parse_probe_output(fixture_text("probe_cpu_torch.json"), interpreter="python")
    assert result.torch is not None and result.torch.cuda is None and result.torch.arch_list == ()
    assert result.errors == ()


def test_parse_probe_output_no_torch_is_a_fact() -> None:
    result = parse_probe_output(fixture_text("probe_no_torch.json"), interpreter="python3")
    assert result.torch is None
    assert any("No module named 'torch'" in e for e in result.errors)


def test_parse_probe_output_flash_attn_coinstalled_prefers_fa2() -> None:
    result = parse_probe_output(fixture_text("probe_fa_coinstalled.json"), interpreter="python")
    assert result.flash_attn is not None
    assert (result.flash_attn.version, result.flash_attn.variant) == ("2.8.3", "fa2")
    assert [d["variant"] for d in result.extra["flash_attn_installed"]] == ["fa2", "fa3", "fa4"]
    # the others are facts too (flash_attn.beside), in the same order, versions spelled as the contract takes them
    assert result.flash_attn.beside == (FlashAttnFacts("3.0.0b1", "fa3"), FlashAttnFacts("4.0.0b27", "fa4"))


def test_parse_probe_output_garbage() -> None:
    with pytest.raises(ProbeError, match="no JSON"):
        parse_probe_output("Segmentation fault\n", interpreter="python")
    bad_arch = json.loads(fixture_text("probe_h100_torch211.json"))
    bad_arch["torch"]["arch_list"] = ["sm_90", "ampere"]  # gfx targets are valid (ROCm torch): see test_rocm_*
    bad_arch["torch"]["cuda"] = "thirteen"
    result = parse_probe_output("noise\n" + json.dumps(bad_arch), interpreter="python")
    assert result.torch is not None and result.torch.arch_list == ("sm_90",) and result.torch.cuda is None
    assert len(result.errors) == 2


def test_target_probe_interpreter_missing_raises_probe_error() -> None:
    runner = ScriptedRunner(lambda argv: CommandNotFound(f"{argv[0]}: not found"))
    with pytest.raises(ProbeError):
        TargetPythonProbe(runner, script="print(1)").probe("/nope/python3")


def test_default_target_python_order() -> None:
    assert default_target_python({"FLEET_TARGET_PYTHON": "/x/python"}, lambda n, p: "/usr/bin/python3") == "/x/python"
    assert default_target_python({}, lambda n, p: "/usr/bin/python3") == "/usr/bin/python3"


# ---------------------------------------------------------------- collect_facts


def test_collect_facts_with_injected_probes_round_trips() -> None:
    runner = ScriptedRunner(lambda argv: ok(argv, fixture_text("nvcc_13.0.txt")) if argv[-1] == "-V" else
                            ok(argv, fixture_text("probe_h100_torch211.json")))
    probes = Probes(
        nvml=NvmlProbe(loader=lambda: FakeNvml(gpus=1)),
        nvcc=_nvcc_probe(runner, on_path=None, env={}, installed=["/usr/local/cuda/bin/nvcc"]),
        target=TargetPythonProbe(runner, script="pass"),
        os=OsProbe(runner, _reader({"/etc/os-release": fixture_text("os-release.ubuntu2204"),
                                    "/proc/meminfo": fixture_text("meminfo.txt")}),
                   machine=lambda: "x86_64", kernel=lambda: "6.8.0-45-generic", confstr_glibc=lambda: "glibc 2.39",
                   cpu_cores=lambda: 16),
    )
    facts = collect_facts("/opt/torch/.venv/bin/python3", hostname="gpu-h100-01", probes=probes)
    assert facts.driver is not None and facts.driver.cuda_max == "13.0"
    assert facts.toolkit is not None and facts.toolkit.path == "/usr/local/cuda/bin/nvcc"
    assert facts.torch is not None and facts.torch.version == "2.11.0+cu130"
    assert facts.apt is None and facts.extra["probe_errors"] == []
    assert facts.extra["toolkits"] == [{"nvcc": "13.0", "path": "/usr/local/cuda/bin/nvcc", "active": True,
                                        "full_version": "13.0.88"}]
    again = parse_node(json.loads(json.dumps(facts.to_json())))
    assert again == facts


def test_collect_facts_target_python_unrunnable_is_a_fact() -> None:
    probes = Probes(nvml=NvmlProbe(loader=lambda: FakeNvml(fail_init=NVMLError_DriverNotLoaded())),
                    target=TargetPythonProbe(ScriptedRunner(lambda argv: CommandNotFound(f"{argv[0]}: not found"))))
    facts = collect_facts("/no/such/python", probes=probes)
    assert facts.driver is None and facts.gpus == () and facts.torch is None
    errors = facts.extra["probe_errors"]
    assert "NVML: driver not loaded" in errors
    assert any("/no/such/python: not found" in e for e in errors)
    assert facts.extra["python_is_agent_fallback"] is True
    parse_node(json.loads(json.dumps(facts.to_json())))

"""Upstream facts vs the packaged matrix, catalog parsing and storage, and error signatures."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from fleetctl.controller.catalog import (
    Catalog,
    add_user_wheels,
    builtin_catalog,
    default_catalog,
    load_user_catalog,
    parse_catalog_text,
    parse_wheel_filename,
)
from fleetctl.controller.diagnose import diagnose, signatures
from fleetctl.controller.resolver import rules
from fleetctl.fleet.errors import CatalogError

MATRIX = json.loads(resources.files("fleetctl.controller.data").joinpath("flash_attn_wheel_matrix.json").read_text())
RELEASES = [r for r in MATRIX if r.get("tag")]


@pytest.mark.parametrize("release", RELEASES, ids=[r["release"] for r in RELEASES])
def test_version_rules_agree_with_each_tag(release: dict[str, object]) -> None:
    setup = release["setup_py"]
    assert isinstance(setup, dict)
    version = str(release["release"])
    assert f">={rules.fmt_mm(rules.python_floor(version))}" == setup["python_requires"]
    assert rules.fmt_mm(rules.min_nvcc(version)) == setup["min_nvcc"]
    assert [str(a) for a in rules.source_archs(version)] == setup["sm_gencode_uncommented"]
    filenames = release.get("expected_wheel_filenames") or []
    assert isinstance(filenames, list)
    for filename in filenames:  # the cu tag format per release
        tag = parse_wheel_filename(str(filename)).cuda_tag
        assert len(tag) == (4 if setup["wheel_cuda_tag"] == "major" else 5)


@pytest.mark.parametrize(("release", "torch_cuda", "torch_mm", "tag"), [
    ("2.2.0", "12.1", "2.1", "cu121"), ("2.3.0", "12.1", "2.1", "cu122"), ("2.3.0", "12.1", "2.2", "cu121"),
    ("2.5.8", "12.4", "2.3", "cu122"), ("2.5.8", "11.7", "2.0", "cu118"), ("2.6.3", "12.6", "2.4", "cu123"),
    ("2.7.0", "11.8", "2.3", "cu11"), ("2.8.3", "13.0", "2.9", "cu12"), ("2.8.3.post1", "13.0", "2.9", "cu13"),
    ("2.8.3.post1", "12.8", "2.7", "cu12"),
])
def test_cu_tag_per_release(release: str, torch_cuda: str, torch_mm: str, tag: str) -> None:
    assert rules.wheel_cuda_tag(release, torch_cuda, torch_mm) == tag


def test_builtin_catalog() -> None:
    catalog = builtin_catalog()
    assert catalog.newest_release == "2.8.3.post1"
    w = catalog.lookup("2.8.3.post1", "cu12", "2.7", True, "cp312", "linux_x86_64")[0]
    assert w.min_glibc == "2.35" and w.cuda_archs == (80, 90, 100, 120)
    assert w.url == ("https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3.post1/"
                     "flash_attn-2.8.3.post1+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl")
    assert catalog.lookup("2.7.4.post1", "cu12", "2.6", True, "cp312", "linux_x86_64")[0].min_glibc == "2.31"


@pytest.mark.parametrize(("name", "problem"), [
    ("flash-attn-2.8.3.tar.gz", "does not start with 'flash_attn-'"),
    ("flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl", "has no local version part"),
    ("flash_attn-2.8.3+torch2.7-cp312-cp312-linux_x86_64.whl", "does not start with a CUDA tag"),
    ("flash_attn-2.8.3+cu12cxx11abiTRUE-cp312-cp312-linux_x86_64.whl", "has no torch major.minor"),
    ("flash_attn-2.8.3+cu12torch2.7-cp312-cp312-linux_x86_64.whl", "has no 'cxx11abiTRUE'"),
    ("flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-py3-none-any.whl", "has no CPython tags"),
    ("flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-macosx_14_0_arm64.whl", "platform is not"),
    ("flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.zip", "does not end with '.whl'"),
])
def test_malformed_wheel_names(name: str, problem: str) -> None:
    with pytest.raises(CatalogError, match=problem):
        parse_wheel_filename(name)


def test_catalog_formats_and_errors(tmp_path: Path) -> None:
    good = "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    text = parse_catalog_text(f"# mirror\n{good}\n\n", "catalog-file", "c.txt")
    assert len(text) == 1 and text.wheels[0].min_glibc is None
    js = parse_catalog_text(json.dumps({"wheels": [{"filename": good, "url": "http://m/x.whl", "sha256": "ab" * 32,
                                                    "min_glibc": "2.35"}]}), "catalog-file", "c.json")
    assert js.wheels[0].url == "http://m/x.whl"
    with pytest.raises(CatalogError, match=r"c.txt line 2: malformed wheel filename 'nope.whl'"):
        parse_catalog_text(f"{good}\nnope.whl\n", "catalog-file", "c.txt")
    with pytest.raises(CatalogError, match="field sha256 must be 64 lowercase hex"):
        parse_catalog_text(json.dumps({"wheels": [{"filename": good, "sha256": "xyz"}]}), "catalog-file", "c.json")
    with pytest.raises(CatalogError, match="field min_glibc"):
        parse_catalog_text(json.dumps({"wheels": [{"filename": good, "min_glibc": "new"}]}), "catalog-file", "c")
    with pytest.raises(CatalogError, match='expected an object with a "wheels" list'):
        parse_catalog_text('{"wheel": []}', "catalog-file", "c.json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        parse_catalog_text('{"wheels": [', "catalog-file", "c.json")


def test_user_catalog_roundtrip_and_precedence(tmp_path: Path) -> None:
    name = "flash_attn-2.8.3.post1+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    wheel = parse_catalog_text(name, "catalog-file", "x").wheels[0]
    path, added = add_user_wheels(tmp_path, Catalog([wheel]))
    assert added == 1 and path == tmp_path / "catalog.json"
    assert add_user_wheels(tmp_path, Catalog([wheel]))[1] == 0
    assert load_user_catalog(tmp_path).wheels[0].origin == "user"
    merged = default_catalog(tmp_path)
    assert merged.lookup("2.8.3.post1", "cu13", "2.11", True, "cp312", "linux_x86_64")[0].origin == "user"
    assert len(merged) == len(builtin_catalog()) + 1


def test_local_wheels_win_over_upstream() -> None:
    name = "flash_attn-2.8.3.post1+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    catalog = builtin_catalog().with_local_wheels([{"filename": name, "sha256": "0" * 64, "url": "http://ctl/a"}])
    assert catalog.lookup("2.8.3.post1", "cu12", "2.7", True, "cp312", "linux_x86_64")[0].origin == "artifact-store"
    with pytest.raises(CatalogError, match="artifact store wheel #0"):
        builtin_catalog().with_local_wheels([{"filename": "bad.whl"}])


# Realistic output lines for every signature (from the cited issues / source code messages).
SAMPLES = {
    "abi_mismatch_cxx11": "ImportError: /venv/lib/python3.10/site-packages/flash_attn_2_cuda.cpython-310-x86_64-linux-"
                          "gnu.so: undefined symbol: _ZN3c105ErrorC2ENS_14SourceLocationESs",
    "torch_version_mismatch": "ImportError: /venv/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: undefined symbol:"
                              " _ZNK3c106SymInt6sym_neERKS0_",
    "gpu_too_old_fa2": "RuntimeError: FlashAttention only supports Ampere GPUs or newer.",
    "gpu_unsupported_fa1": "RuntimeError: Expected is_sm90 || is_sm8x || is_sm75 to be true, but got false.",
    "nvcc_missing": "OSError: CUDA_HOME environment variable is not set. Please set it to your CUDA install root.",
    "nvcc_too_old": "RuntimeError: FlashAttention is only supported on CUDA 11.7 and above.  Note: make sure nvcc "
                    "has a supported version by running nvcc -V.",
    "fa3_cuda_too_old": "RuntimeError: FlashAttention-3 is only supported on CUDA 12.3 and above",
    "nvcc_torch_cuda_major_mismatch": "RuntimeError:\nThe detected CUDA version (11.8) mismatches the version that "
                                      "was used to compile\nPyTorch (12.1). Please make sure to use the same CUDA "
                                      "versions.",
    "no_kernel_image": "torch.AcceleratorError: CUDA error: no kernel image is available for execution on the device",
    "nvcc_unsupported_arch": "nvcc fatal   : Unsupported gpu architecture 'compute_120'",
    "compile_oom": "g++: fatal error: Killed signal terminated program cc1plus\ncompilation terminated.",
    "ninja_missing_slow_build": "UserWarning: Attempted to use ninja as the BuildExtension backend but we could not "
                                "find ninja.. Falling back to using the slow distutils backend.",
    "build_isolation_no_torch": "      ModuleNotFoundError: No module named 'torch'",
    "no_prebuilt_wheel_fallback": "      Guessing wheel URL:  https://github.com/Dao-AILab/flash-attention/releases/"
                                  "download/v2.8.3/flash_attn-2.8.3+cu12torch2.9cxx11abiTRUE-cp312-cp312-linux_x86_64"
                                  ".whl\n      Precompiled wheel not found. Building from source...",
    "http_404_red_herring": "urllib.error.HTTPError: HTTP Error 404: Not Found",
    "network_blocked_wheel_download": "urllib.error.URLError: <urlopen error [Errno -3] Temporary failure in name "
                                      "resolution>",
    "glibc_too_old": "ImportError: /lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.32' not found (required by "
                     "/venv/lib/python3.8/site-packages/flash_attn_2_cuda.cpython-38-x86_64-linux-gnu.so)",
    "cudart_major_mismatch": "ImportError: libcudart.so.12: cannot open shared object file: No such file or directory",
    "gcc_too_new_for_nvcc": "/usr/local/cuda/include/crt/host_config.h:143:2: error: #error -- unsupported GNU "
                            "version! gcc versions later than 12 are not supported!",
    "ptx_toolchain_newer_than_driver": "RuntimeError: CUDA error: the provided PTX was compiled with an unsupported "
                                       "toolchain.",
    "transformers_fa2_not_installed": "ImportError: FlashAttention2 has been toggled on, but it cannot be used due "
                                      "to the following error: the package flash_attn seems to be not installed.",
    "fa2_dtype": "RuntimeError: FlashAttention only support fp16 and bf16 data type",
    "fa4_unsupported_cc": "AssertionError: Unsupported compute capability. Supported: 8.x, 9.x, 10.x, 11.x, 12.x",
    "cutedsl_insufficient_driver": "cuda.bindings.runtime error: cudaErrorInsufficientDriver (Error Code: 35)",
    "git_missing_old_setup": "FileNotFoundError: [Errno 2] No such file or directory: 'git'",
    "sdpa_flash_backend_unavailable": "UserWarning: Flash attention only supports gpu architectures in the range "
                                      "[sm80, sm121]. Attempting to run on a sm 7.5 gpu.",
    "apt_repo_key": "W: GPG error: https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64  "
                    "InRelease: The following signatures couldn't be verified because the public key is not "
                    "available: NO_PUBKEY A4B469963BF863CC",
}


# Issue 19: the ten texts `fleetctl diagnose` did not match and the one it got wrong, verbatim from the cited
# upstream issues (paths as the reporters posted them); each maps to the signature that must explain it.
ISSUE_19 = {
    "glibcxx_too_old": "ImportError: /usr/lib/x86_64-linux-gnu/libstdc++.so.6: version `GLIBCXX_3.4.26' not found "
                       "(required by /home/whuav/anaconda3/envs/MeshAnything/lib/python3.10/site-packages/"
                       "flash_attn_2_cuda.cpython-310-x86_64-linux-gnu.so)",  # buaacyw/MeshAnything#20
    "gxx_older_than_cuda_minimum": "  RuntimeError: The current installed version of g++ (4.8.5) is less than the "
                                   "minimum required version by CUDA 11.7 (6.0.0). Please make sure to use an "
                                   "adequate version of g++ (>=6.0.0, <12.0).",  # torch cpp_extension
    "fa1_backward_headdim_64": "RuntimeError: FlashAttention backward for head dim > 64 requires A100 or H100 GPUs as "
                               "the implementation needs a large amount of shared memory.",  # LlamaFactory#371
    "fa1_api_with_fa2_imports": "ImportError: cannot import name 'flash_attn_func' from 'flash_attn' "
                                "(/usr/local/lib/python3.10/dist-packages/flash_attn/__init__.py)",  # FlashFace#10
    "msvc_unsupported_by_nvcc": "host_config.h(153): fatal error C1189: #error:  -- unsupported Microsoft Visual "
                                "Studio version! Only the versions between 2017 and 2022 (inclusive) are supported! "
                                "The nvcc flag '-allow-unsupported-compiler' can be used to override this version "
                                "check",  # Wan-Video/Wan2.1#207
    "wheel_not_supported_platform": "ERROR: flash_attn-2.7.2.post1+cu12torch2.5cxx11abiFALSE-cp310-cp310-linux_x86_64"
                                    ".whl is not a supported wheel on this platform.",  # nano-aha-moment#3
    "gcc11_parameter_packs": "      /usr/include/c++/11/bits/std_function.h:435:145: error: parameter packs not "
                             "expanded with ‘...’:",  # flash-attention#191
    "torch_abi_undefined_symbol": "ImportError: /root/miniconda3/envs/r1v/lib/python3.11/site-packages/flash_attn_2_"
                                  "cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZNK3c1011StorageImpl27"
                                  "throw_data_ptr_access_errorEv",  # StarsfieldAI/R1-V#127, flash-attention#1509
    "fa2_backward_headdim_192": "RuntimeError: FlashAttention backward for head dim > 192 requires A100/A800 or "
                                "H100/H800",  # README before 2.5.5, flash-attention#579
    "verify_target_python_without_torch": "torch is not importable in /opt/ml/venv/bin/python: "
                                          "ModuleNotFoundError: No module named 'torch'",  # agent/verify/bench.py
    "fa2_api_with_fa1_imports": "ImportError: cannot import name 'flash_attn_unpadded_qkvpacked_func' from "
                                "'flash_attn.flash_attn_interface' (/data1/yanzh/.conda/envs/mgie/lib/python3.10/"
                                "site-packages/flash_attn/flash_attn_interface.py)",  # flash-attention#1280
}
WHAT_SYMBOL = ("ImportError: /opt/conda/envs/viscot/lib/python3.10/site-packages/flash_attn_2_cuda.cpython-310-x86_64-"
               "linux-gnu.so: undefined symbol: _ZNK3c105Error4whatEv")  # deepcs233/Visual-CoT#25
SAMPLES.update(ISSUE_19)


def test_every_signature_has_a_sample_a_plan_change_and_a_source() -> None:
    assert {s.id for s in signatures()} == set(SAMPLES)
    for sig in signatures():
        assert sig.action and sig.plan_change and sig.source and sig.cause and sig.remedy, sig.id


@pytest.mark.parametrize("sig_id", sorted(ISSUE_19))
def test_issue_19_text_is_explained_by_its_signature_alone(sig_id: str) -> None:
    found = [d for d in diagnose(ISSUE_19[sig_id]) if not d.red_herring]
    assert [d.id for d in found] == [sig_id]
    assert found[0].match and found[0].match in ISSUE_19[sig_id] and found[0].pattern


def test_second_c10_symbol_and_no_more_build_isolation_misdiagnosis() -> None:
    assert [d.id for d in diagnose(WHAT_SYMBOL)] == ["torch_abi_undefined_symbol"]
    pip_log = "  File \"<string>\", line 9, in <module>\n      ModuleNotFoundError: No module named 'torch'"
    assert [d.id for d in diagnose(pip_log)] == ["build_isolation_no_torch"]


@pytest.mark.parametrize("sig_id", sorted(SAMPLES))
def test_signature_matches_real_text(sig_id: str) -> None:
    found = diagnose(f"some preamble\n{SAMPLES[sig_id]}\nmore output\n")
    assert sig_id in [d.id for d in found]
    hit = next(d for d in found if d.id == sig_id)
    assert hit.line >= 2 and hit.cause and hit.remedy and hit.action


def test_cxx11_variant_and_ordering() -> None:
    cxx11 = ("flash_attn_2_cuda.so: undefined symbol: _ZN3c105ErrorC2ENS_14SourceLocationENSt7__cxx1112basic_string"
             "IcSt11char_traitsIcESaIcEEE")
    assert [d.id for d in diagnose(cxx11)] == ["abi_mismatch_cxx11"]
    log = f"{SAMPLES['http_404_red_herring']}\nDuring handling of the above exception\n{SAMPLES['compile_oom']}"
    assert [d.id for d in diagnose(log)][:2] == ["compile_oom", "http_404_red_herring"]
    assert diagnose("all good\n") == []

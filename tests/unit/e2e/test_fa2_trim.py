"""scripts/device/fa2_trim.py on a miniature sdist shaped like PyPI's flash_attn-2.8.3.tar.gz (the parts it
patches, verbatim from upstream): what the trimmed sdist keeps, drops and says, that it is reproducible, and that
an sdist it does not recognise is refused rather than half-patched. The real one was trimmed, built and run on an
H200 (docs/gpu-e2e.md, tests/fixtures/h200_attention_fa2)."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "device" / "fa2_trim.py"
HEADDIMS = (32, 64, 96, 128, 192, 256)


def _trim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fa2_trim", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fa2_trim"] = mod
    spec.loader.exec_module(mod)
    return mod


T = _trim()


def _kernels() -> list[str]:
    return [f"csrc/flash_attn/src/flash_{kind}_hdim{d}_{dt}{c}_sm80.cu" for kind in ("fwd", "bwd", "fwd_split")
            for c in ("", "_causal") for d in HEADDIMS for dt in ("fp16", "bf16")]


def _setup_py(kernels: list[str]) -> str:
    flags = "".join(f'    # "-DFLASHATTENTION_DISABLE_{f}",\n'
                    for f in ("BACKWARD", "DROPOUT", "ALIBI", "SOFTCAP", "UNEVEN_K", "LOCAL"))
    sources = "".join(f'                "{k}",\n' for k in kernels)
    return (f'nvcc_flags = [\n    "-O3",\n{flags}    ]\n\n    compiler_c17_flag=["-O3", "-std=c++17"]\n'
            f'ext = CUDAExtension(\n            sources=[\n                "csrc/flash_attn/flash_api.cpp",\n'
            f'{sources}            ],\n)\n')


def _sdist(path: Path, kernels: list[str] | None = None, version: str = "2.8.3") -> Path:
    kernels = _kernels() if kernels is None else kernels
    files = {"setup.py": _setup_py(kernels),
             "PKG-INFO": f"Metadata-Version: 2.2\nName: flash_attn\nVersion: {version}\n",
             "flash_attn/__init__.py": f'__version__ = "{version}"\n',
             "csrc/flash_attn/src/static_switch.h": f"#pragma once\n{T.UPSTREAM_SWITCH}\n",
             **{k: f"// {k}\n" for k in kernels}}
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"flash_attn-{version}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _members(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read().decode() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_keeps_hdim64_and_128_kernels_turns_the_switches_on_and_says_so(tmp_path: Path) -> None:
    out = T.trim(_sdist(tmp_path / "up.tar.gz"), tmp_path / "out")
    assert out.name == "flash_attn-2.8.3+trim.hd64.hd128.tar.gz"
    files = {k.split("/", 1)[1]: v for k, v in _members(out).items()}
    assert {k.split("/", 1)[0] for k in _members(out)} == {"flash_attn-2.8.3+trim.hd64.hd128"}
    cu = sorted(k for k in files if k.endswith(".cu"))
    assert len(cu) == 24 and all("_hdim64_" in k or "_hdim128_" in k for k in cu)
    assert {k.split("_hdim")[0].rsplit("flash_", 1)[1] for k in cu} == {"fwd", "bwd", "fwd_split"}
    setup = files["setup.py"]
    assert setup.count('.cu",') == 24
    host = setup.split("compiler_c17_flag=")[1].splitlines()[0]
    for flag in ("DROPOUT", "ALIBI", "SOFTCAP", "LOCAL"):  # for nvcc and for the host compiler (flash_api.cpp)
        assert f'"-DFLASHATTENTION_DISABLE_{flag}",  # fa2_trim' in setup
        assert f'"-DFLASHATTENTION_DISABLE_{flag}"' in host
    for kept in ("BACKWARD", "UNEVEN_K"):
        assert f'# "-DFLASHATTENTION_DISABLE_{kept}",' in setup
    switch = files["csrc/flash_attn/src/static_switch.h"]
    assert "HEADDIM > 32 && HEADDIM <= 64" in switch and "HEADDIM > 96 && HEADDIM <= 128" in switch
    assert "kHeadDim = 256" not in switch and "TORCH_CHECK(false" in switch
    assert ", HEADDIM," not in switch  # no number streamed into the message (it crashed on the H200)
    assert files["flash_attn/__init__.py"] == '__version__ = "2.8.3+trim.hd64.hd128"\n'
    assert "\nVersion: 2.8.3+trim.hd64.hd128\n" in files["PKG-INFO"]
    note = files["TRIMMED.txt"]
    assert "TRIMMED" in note and "not a release of flash-attn" in note and "24 files" in note


def test_the_same_input_gives_the_same_bytes(tmp_path: Path) -> None:
    src = _sdist(tmp_path / "up.tar.gz")
    a = T.trim(src, tmp_path / "a").read_bytes()
    b = T.trim(src, tmp_path / "b").read_bytes()
    assert a == b


def test_an_sdist_it_does_not_recognise_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="expected 24 and 48"):
        T.trim(_sdist(tmp_path / "few.tar.gz", kernels=_kernels()[:10]), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    # the command line checks the input is PyPI's flash_attn-2.8.3.tar.gz before anything
    assert T.main([str(_sdist(tmp_path / "up.tar.gz")), str(tmp_path / "out2")]) == 1
    assert not (tmp_path / "out2").exists()

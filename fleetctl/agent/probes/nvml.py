"""NVML through nvidia-ml-py (``import pynvml``): driver version, the driver's maximum CUDA, every GPU.

Any failure (library missing, driver not loaded, a GPU that stops answering) becomes a
reason in ``NvmlResult.errors``, never an exception: no driver means ``driver=None`` and no GPUs.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetctl.fleet.facts import DriverFacts, GpuFacts

MIB = 1024 * 1024


@dataclass(frozen=True)
class NvmlResult:
    driver: DriverFacts | None
    gpus: tuple[GpuFacts, ...]
    errors: tuple[str, ...] = field(default=())


def _load_pynvml() -> Any:
    return importlib.import_module("pynvml")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def cuda_version_text(encoded: int) -> str:
    """NVML encodes CUDA 13.0 as 13000 and 12.4 as 12040."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


# pynvml's exception classes → what a person should read.
_KNOWN_REASONS = {
    "NVMLError_LibraryNotFound": "libnvidia-ml.so.1 not found (no NVIDIA driver installed)",
    "NVMLError_DriverNotLoaded": "driver not loaded",
    "NVMLError_NoPermission": "no permission to query the driver",
    "NVMLError_GpuIsLost": "GPU is lost (fell off the bus)",
    "NVMLError_Uninitialized": "NVML not initialised",
}


def _reason(exc: BaseException) -> str:
    known = _KNOWN_REASONS.get(type(exc).__name__)
    if known:
        return known
    text = str(exc).strip() or type(exc).__name__
    # pynvml's messages are Title Case ("Driver Not Loaded"); say them the way people write them.
    return text[0] + text[1:].lower() if text.istitle() else text


class NvmlProbe:
    """Reads NVML. ``loader`` returns the ``pynvml`` module (tests pass a fake module)."""

    def __init__(self, loader: Callable[[], Any] = _load_pynvml) -> None:
        self._loader = loader

    def probe(self) -> NvmlResult:
        try:
            nvml = self._loader()
        except ImportError as exc:
            return NvmlResult(None, (), (f"NVML: nvidia-ml-py is not installed ({exc})",))
        try:
            nvml.nvmlInit()
        except Exception as exc:  # pynvml raises NVMLError subclasses; a broken lib raises anything
            return NvmlResult(None, (), (f"NVML: {_reason(exc)}",))
        try:
            return self._read(nvml)
        finally:
            # shutting down after a failed read must not hide the read's reason
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()

    def _read(self, nvml: Any) -> NvmlResult:
        errors: list[str] = []
        try:
            version = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception as exc:
            return NvmlResult(None, (), (f"NVML: cannot read the driver version: {_reason(exc)}",))
        try:
            getter = getattr(nvml, "nvmlSystemGetCudaDriverVersion_v2", None) or nvml.nvmlSystemGetCudaDriverVersion
            cuda_max = cuda_version_text(int(getter()))
        except Exception as exc:
            return NvmlResult(None, (), (f"NVML: driver {version}: cannot read its CUDA version: {_reason(exc)}",))
        driver = DriverFacts(version=version, cuda_max=cuda_max)

        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            return NvmlResult(driver, (), (f"NVML: cannot count GPUs: {_reason(exc)}",))
        gpus: list[GpuFacts] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                gpus.append(GpuFacts(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    compute_capability=f"{int(major)}.{int(minor)}",
                    memory_mib=int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // MIB,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                ))
            except Exception as exc:
                errors.append(f"NVML: GPU {index}: {_reason(exc)}")
        return NvmlResult(driver, tuple(gpus), tuple(errors))

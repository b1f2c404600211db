"""What a node's GPUs are doing now, behind one small interface (``GpuUseSource.read() -> UseReport``).

* ``NvmlGpuUse``: real GPUs, through NVML (``nvmlDeviceGetComputeRunningProcesses`` and
  ``nvmlDeviceGetUtilizationRates`` per GPU); a process's name comes from ``/proc/PID/comm`` when this
  agent may read it (a pid in another container's namespace shows by pid only).
* ``SimulatedGpuUse``: the simulated GPUs of a simulated node. Its documented source (docs/rollout.md, "Busy
  GPUs"): the directory ``STATE/simulated-gpu-use/`` of the agent's state dir, one file ``gpu<N>.pid`` per GPU
  holding process ids, one a line. GPU N is busy while one of those processes is alive, so a real process —
  a test's, a demo's — can hold a simulated GPU, and frees it by exiting. Every report says ``simulated``.

Reading never raises: what cannot be read becomes ``UseReport.error``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from fleetctl.fleet.workload import GpuProcess, GpuUse, UseReport

SIMULATED_USE_DIR = "simulated-gpu-use"
MIB = 1024 * 1024


class GpuUseSource(Protocol):
    def read(self) -> UseReport: ...


def process_name(pid: int) -> str:
    """The process's command name, or "" when it cannot be read (gone, another pid namespace, no permission)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody waited for holds no GPU)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _load_pynvml() -> Any:
    return importlib.import_module("pynvml")


class NvmlGpuUse:
    """Compute processes and utilisation of every GPU, from NVML. ``loader`` returns the ``pynvml`` module."""

    def __init__(self, loader: Callable[[], Any] = _load_pynvml) -> None:
        self._loader = loader

    def read(self) -> UseReport:
        try:
            nvml = self._loader()
            nvml.nvmlInit()
        except Exception as exc:  # ImportError, or NVMLError subclasses (no driver, no permission)
            return UseReport((), "nvml", f"NVML unavailable: {str(exc) or type(exc).__name__}")
        try:
            count = int(nvml.nvmlDeviceGetCount())
            gpus: list[GpuUse] = []
            errors: list[str] = []
            for index in range(count):
                try:
                    gpus.append(self._gpu(nvml, index))
                except Exception as exc:
                    errors.append(f"GPU {index}: {str(exc) or type(exc).__name__}")
            return UseReport(tuple(gpus), "nvml", "; ".join(errors) or None)
        except Exception as exc:
            return UseReport((), "nvml", f"NVML: {str(exc) or type(exc).__name__}")
        finally:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()

    @staticmethod
    def _gpu(nvml: Any, index: int) -> GpuUse:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        procs = []
        for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle) or ():
            used = getattr(p, "usedGpuMemory", None)
            procs.append(GpuProcess(int(p.pid), process_name(int(p.pid)),
                                    int(used) // MIB if isinstance(used, int) else None))
        try:
            util: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # not supported on some boards (MIG instances): the processes decide
            util = None
        return GpuUse(index, util, tuple(procs))


class SimulatedGpuUse:
    """The simulated GPUs ``indices`` of a simulated node, busy while a process named in
    ``state_dir/simulated-gpu-use/gpu<N>.pid`` is alive."""

    def __init__(self, state_dir: Path, indices: Sequence[int]) -> None:
        self.dir = state_dir / SIMULATED_USE_DIR
        self.indices = tuple(indices)

    def read(self) -> UseReport:
        gpus: list[GpuUse] = []
        for index in self.indices:
            try:
                lines = (self.dir / f"gpu{index}.pid").read_text().split()
            except FileNotFoundError:
                lines = []
            except OSError as exc:
                return UseReport(tuple(gpus), "simulated", f"{self.dir}: {exc.strerror or exc}")
            pids = [int(x) for x in lines if x.isdigit()]
            gpus.append(GpuUse(index, None, tuple(GpuProcess(p, process_name(p)) for p in pids if alive(p))))
        return UseReport(tuple(gpus), "simulated")


def hold_simulated_gpu(state_dir: Path, index: int, pid: int) -> Path:
    """Make process ``pid`` hold simulated GPU ``index`` of the agent whose state dir is ``state_dir``
    (tests, demos); returns the pid file. The GPU is free again once the process exits."""
    path = state_dir / SIMULATED_USE_DIR / f"gpu{index}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"{pid}\n")
    return path

"""Match install/build/import/runtime output against known FlashAttention error signatures.

The signatures (``controller/data/flash_attn_error_signatures.json``) come from upstream code
and issues, each with a cause, a remedy and its source; ``PLAN_CHANGES`` adds what each one
means for the plan, so a rollout can act on a failed step (``diagnose(step_output)``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

# Lines that appear in failed logs without being the cause; reported after real findings.
RED_HERRINGS = frozenset({"http_404_red_herring", "git_missing_old_setup", "network_blocked_wheel_download",
                          "no_prebuilt_wheel_fallback"})

# signature id → (action, plan change in words). Actions are stable strings a rollout can switch on.
PLAN_CHANGES: dict[str, tuple[str, str]] = {
    "abi_mismatch_cxx11": ("replan", "re-probe torch's cxx11abi and install the wheel with the matching "
                                     "cxx11abi tag (or build from source)"),
    "torch_version_mismatch": ("replan", "re-probe torch (it changed after flash-attn was installed) and "
                                         "install the wheel for its major.minor or build from source"),
    "gpu_too_old_fa2": ("use-sdpa-or-fa1", "plan SDPA for cc < 7.5, FA1 for Turing, FA2 ≥ 2.7.3 for Blackwell"),
    "gpu_unsupported_fa1": ("use-sdpa", "plan SDPA for this GPU"),
    "nvcc_missing": ("install-wheel-or-toolkit", "install the wheel by path/URL, or add a cuda-toolkit step "
                                                 "matching torch's CUDA major"),
    "nvcc_too_old": ("cuda-toolkit", "add a cuda-toolkit step ≥ the release's nvcc floor, same major as torch"),
    "fa3_cuda_too_old": ("cuda-toolkit", "add a cuda-toolkit step ≥ 12.3 (12.8 recommended) or plan FA2"),
    "nvcc_torch_cuda_major_mismatch": ("cuda-toolkit", "add a cuda-toolkit step with torch's CUDA major.minor "
                                                       "(≤ the driver's maximum)"),
    "no_kernel_image": ("rebuild-for-arch", "rebuild with FLASH_ATTN_CUDA_ARCHS including this GPU (nvcc ≥ 12.8 "
                                            "for Blackwell) or use a release whose wheels carry it"),
    "nvcc_unsupported_arch": ("cuda-toolkit", "install nvcc ≥ 12.8 for sm_100/sm_120, or narrow "
                                              "FLASH_ATTN_CUDA_ARCHS/TORCH_CUDA_ARCH_LIST"),
    "compile_oom": ("retry-lower-jobs", "retry build-from-source with MAX_JOBS halved and archs narrowed"),
    "ninja_missing_slow_build": ("install-ninja", "pip install ninja in the target Python, then rebuild"),
    "build_isolation_no_torch": ("retry-no-build-isolation", "install with --no-build-isolation after torch, "
                                                             "packaging, psutil and ninja"),
    "no_prebuilt_wheel_fallback": ("install-wheel", "install the planned wheel by path/URL so setup.py never "
                                                    "guesses; or build deliberately (FLASH_ATTENTION_FORCE_BUILD)"),
    "http_404_red_herring": ("none", "look further down the log for the real build error"),
    "network_blocked_wheel_download": ("use-artifact-store", "serve the wheel from the controller's artifact store"),
    "glibc_too_old": ("replan", "choose a wheel whose glibc floor the node meets (e.g. 2.7.4.post1 on glibc "
                                "2.31) or build from source"),
    "cudart_major_mismatch": ("replan", "install the wheel whose cu tag matches torch's CUDA major"),
    "gcc_too_new_for_nvcc": ("cuda-toolkit", "use a newer CUDA toolkit or point NVCC_CCBIN at an older gcc"),
    "ptx_toolchain_newer_than_driver": ("upgrade-driver", "upgrade the driver or build with nvcc ≤ its maximum CUDA"),
    "transformers_fa2_not_installed": ("replan", "install flash-attn (re-run the plan) or use SDPA"),
    "fa2_dtype": ("none", "application error: cast q/k/v to fp16/bf16"),
    "fa4_unsupported_cc": ("use-fa2", "plan FA2 or SDPA for this GPU instead of FA4"),
    "cutedsl_insufficient_driver": ("upgrade-driver", "upgrade the driver (≥ 575.51.03 quoted) or plan FA2"),
    "git_missing_old_setup": ("none", "install git for releases ≤ 2.7.2; the 'not a git repository' line is noise"),
    "sdpa_flash_backend_unavailable": ("none", "nothing to install: SDPA falls back by itself"),
    "apt_repo_key": ("apt-keyring-fix", "run apt-keyring-fix before the cuda-toolkit step"),
}


@dataclass(frozen=True)
class Signature:
    id: str
    stage: str
    pattern: re.Pattern[str]
    cause: str
    remedy: str
    source: str
    confidence: str


@dataclass(frozen=True)
class Diagnosis:
    id: str
    stage: str
    cause: str
    remedy: str
    action: str
    plan_change: str
    line: int  # 1-based line of the first match
    excerpt: str
    source: str
    confidence: str
    red_herring: bool

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stage": self.stage, "cause": self.cause, "remedy": self.remedy,
                "action": self.action, "plan_change": self.plan_change, "line": self.line, "excerpt": self.excerpt,
                "source": self.source, "confidence": self.confidence, "red_herring": self.red_herring}


@lru_cache(maxsize=1)
def signatures() -> tuple[Signature, ...]:
    raw = json.loads(resources.files("controller.data").joinpath("flash_attn_error_signatures.json").read_text())
    return tuple(Signature(id=s["id"], stage=s["stage"], pattern=re.compile(s["pattern"], re.MULTILINE),
                           cause=s["cause"], remedy=s["remedy"], source=s["source"], confidence=s["confidence"])
                 for s in raw)


def diagnose(text: str) -> list[Diagnosis]:
    """Every signature found in ``text``: real causes first (in order of appearance), red herrings last."""
    found: list[Diagnosis] = []
    for sig in signatures():
        match = sig.pattern.search(text)
        if match is None:
            continue
        line = text.count("\n", 0, match.start()) + 1
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        excerpt = text[start:end if end != -1 else len(text)].strip()[:300]
        action, change = PLAN_CHANGES.get(sig.id, ("none", "see the remedy"))
        found.append(Diagnosis(id=sig.id, stage=sig.stage, cause=sig.cause, remedy=sig.remedy, action=action,
                               plan_change=change, line=line, excerpt=excerpt, source=sig.source,
                               confidence=sig.confidence, red_herring=sig.id in RED_HERRINGS))
    return sorted(found, key=lambda d: (d.red_herring, d.line))

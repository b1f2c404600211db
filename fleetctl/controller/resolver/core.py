"""``resolve``: node facts + catalog + policy → one decision (DESIGN §3.2). Pure: no I/O.

Order of rules: blocked (node cannot run torch on its GPU) → GPU generation (SDPA below
cc 7.5, FA1 on Turing, FA3/FA4 when the policy asks, FA2 otherwise) → FA2 wheel for the
target release → FA2 source build with a qualifying toolkit → apt key fix → already
installed. Every candidate that loses is listed in ``rejected`` with its reason.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

from fleetctl.controller.resolver import platforms, rules
from fleetctl.controller.resolver.build import build_params
from fleetctl.controller.resolver.model import BuildParams, Decision, MeasuredImpl, Measurements, Policy, Rejected
from fleetctl.controller.resolver.resolution import Toolkit, WheelQuery, arch_label, pick_wheel, python_mm, wheel_query
from fleetctl.fleet.facts import GpuFacts, NodeFacts, version_tuple

if TYPE_CHECKING:  # controller.catalog imports controller.resolver.rules; keep this package import-light
    from fleetctl.controller.catalog import Catalog, Wheel

# apt-get update output when a repository's signing key is missing, expired or absent (DESIGN §1, rule 6)
APT_KEY_RE = re.compile(r"(?:NO_PUBKEY|EXPKEYSIG|KEYEXPIRED)\s+\S+|is not signed|not signed")
SDPA_HINT = 'use PyTorch SDPA (attn_implementation="sdpa")'


def _gpu_label(gpu: GpuFacts) -> str:
    return f"GPU {gpu.index} ({gpu.name}, cc {gpu.compute_capability})"


def resolve(facts: NodeFacts, catalog: Catalog, policy: Policy, measured: Measurements | None = None) -> Decision:
    """Decide how to get FlashAttention onto one node. Never raises on odd facts: a node that
    cannot be served gets ``variant="blocked"`` with reasons that say what to fix. ``measured`` (the
    attention recommendation's ranking, controller/attention.py) is read only by ``policy.prefer="fastest"``."""
    return _Resolution(facts, catalog, policy, measured).decide()


# an implementation (or transformers setting) → the family the resolver installs; "sdpa": nothing to install
_FAMILY = {"fa1": "fa1", "fa2": "fa2", "fa3": "fa3", "fa4": "fa4", "flash_attention_2": "fa2", "sdpa": "sdpa",
           "eager": "sdpa", "sdpa_cudnn": "sdpa", "sdpa_flash": "sdpa", "sdpa_efficient": "sdpa", "sdpa_math": "sdpa"}


class _Resolution:
    def __init__(self, facts: NodeFacts, catalog: Catalog, policy: Policy,
                 measured: Measurements | None = None) -> None:
        self.facts = facts
        self.catalog = catalog
        self.policy = policy
        self.measured = measured
        self.target = policy.version or catalog.newest_release
        self.reasons: list[str] = []
        self.rejected: list[Rejected] = []

    # --- outcomes ---------------------------------------------------------------------------

    def reject(self, candidate: str, reason: str) -> None:
        self.rejected.append(Rejected(candidate, reason))

    def _decision(self, variant: str, version: str | None, steps: tuple[str, ...], *, artifact: Wheel | None = None,
                  toolkit: str | None = None, build_nvcc: tuple[int, int] | None = None,
                  node_archs: tuple[int, ...] = ()) -> Decision:
        installs = any(s != "verify" for s in steps)
        installed = self.facts.flash_attn
        if installs and version is not None and installed is not None:
            if installed.version == version and _generation(installed.variant) in (None, _generation(variant)):
                self.reasons.append(f"flash-attn {version} ({installed.variant}) is already installed: only verify it")
                return self.finish(variant, version, ("verify",))
            self.reasons.append(f"replaces the installed flash-attn {installed.version} ({installed.variant})")
        if installs:
            steps = self.apt_first(steps)
        build = None
        if build_nvcc is not None:
            build = build_params(self.facts, variant, version or "", node_archs, build_nvcc)
            self.reasons.append(f"build with {', '.join(f'{k}={v}' for k, v in build.env.items())} "
                                f"(about {build.estimated_minutes} min on {self.facts.resources.cpu_cores} cores)")
        return self.finish(variant, version, steps, artifact=artifact, toolkit=toolkit, build=build)

    def finish(self, variant: str, version: str | None, steps: tuple[str, ...], *, artifact: Wheel | None = None,
                toolkit: str | None = None, build: BuildParams | None = None) -> Decision:
        return Decision(hostname=self.facts.hostname, variant=variant, flash_attn_version=version,
                        artifact=artifact.filename if artifact else None, toolkit=toolkit, steps=steps,
                        reasons=tuple(self.reasons), rejected=tuple(self.rejected), build=build,
                        artifact_url=artifact.url if artifact else None)

    def apt_first(self, steps: tuple[str, ...]) -> tuple[str, ...]:
        errors = self.facts.apt.errors if self.facts.apt else ()
        found = [m.group(0) for e in errors if (m := APT_KEY_RE.search(e))]
        if found:
            self.reasons.append("apt-get update fails on a repository signing key (missing, expired or unsigned: "
                                f"{', '.join(dict.fromkeys(found))}): fix the keyring before anything else")
            return ("apt-keyring-fix", *steps)
        if errors and "cuda-toolkit" in steps:
            self.reasons.append(f"apt-get update reports errors that are not key problems; the cuda-toolkit step "
                                f"may fail until they are fixed: {errors[0][:160]}")
        return steps

    # --- the rules --------------------------------------------------------------------------

    def decide(self) -> Decision:
        if any(g.is_amd for g in self.facts.gpus):
            return platforms.rocm(self)
        jetson = platforms.jetson_facts(self)
        if jetson is not None:
            self.facts = jetson
        blockers = self._blockers()
        if blockers:
            self.reasons.extend(blockers)
            for candidate in self._all_candidates():
                self.reject(candidate, "the node cannot run CUDA torch on its GPU (see reasons)")
            return self.finish("blocked", None, ())
        ccs = [rules.parse_cc(g.compute_capability) for g in self.facts.gpus]
        oldest = min(ccs)
        if len(set(ccs)) > 1:
            self.reasons.append(f"mixed GPUs (cc {', '.join(sorted({g.compute_capability for g in self.facts.gpus}))}):"
                                " one install serves them all, so the oldest decides the FlashAttention generation")
        if oldest < (7, 5):
            return self._sdpa_old_gpu(oldest)
        if self.facts.os.is_windows:
            return platforms.windows(self, tuple(ccs))
        if oldest < (8, 0):
            return self._turing()
        return self._ampere_or_newer(tuple(ccs))

    def _blockers(self) -> list[str]:
        f = self.facts
        out: list[str] = []
        if f.driver is None:
            out.append("no NVIDIA driver found: install the NVIDIA driver (nvidia-smi must work), "
                       "then re-run the agent")
        if not f.gpus:
            out.append("no NVIDIA GPU reported: check the GPU is visible to the driver (nvidia-smi -L)")
        if f.torch is None:
            out.append(f"torch is not installed in the target Python {f.python.executable}: "
                       "install a CUDA build of torch there")
            return out
        if f.torch.cuda is None:
            out.append(f"torch {f.torch.version} is a CPU-only build: install a CUDA build of torch"
                       + (f" for CUDA ≤ {f.driver.cuda_max} (the driver's maximum)" if f.driver else ""))
            return out
        torch_major = rules.major_minor(f.torch.cuda)[0]
        if f.driver is not None and torch_major > rules.major_minor(f.driver.cuda_max)[0]:
            out.append(f"torch {f.torch.version} is built for CUDA {f.torch.cuda} but driver {f.driver.version} "
                       f"supports at most CUDA {f.driver.cuda_max}: upgrade the driver to one for CUDA "
                       f"{torch_major}.x or install a torch built for CUDA "
                       f"{rules.major_minor(f.driver.cuda_max)[0]}.x")
        for gpu in f.gpus:
            cc = rules.parse_cc(gpu.compute_capability)
            if not any(rules.arch_code_runs_on(a, cc) for a in f.torch.arch_list):
                listed = " ".join(f.torch.arch_list) or "empty"
                out.append(f"torch {f.torch.version} has no code for {_gpu_label(gpu)}: its arch_list ({listed}) "
                           f"has no sm_{cc[0]}x with x ≤ {cc[1]} and no compute_XY PTX at or below "
                           f"{cc[0]}{cc[1]}; install a torch build that includes sm_{cc[0]}{cc[1]}")
        return out

    def _all_candidates(self) -> list[str]:
        fa2 = self.target or "(no target)"
        return [f"fa2-wheel {fa2}", f"fa2-source {fa2}", f"fa1-source {rules.FA1_VERSION}",
                f"fa3-source {rules.FA3_VERSION}", f"fa4 {rules.FA4_VERSION}", "sdpa"]

    def _sdpa_old_gpu(self, cc: tuple[int, int]) -> Decision:
        gen = "no FlashAttention generation supports GPUs below compute capability 7.5"
        self.reasons.append(f"GPU compute capability {rules.fmt_mm(cc)} < 7.5: {gen}; {SDPA_HINT}, "
                            "which picks its mem-efficient or math backend; nothing to install")
        fa2 = self.target or "(no target)"
        self.reject(f"fa2-wheel {fa2}", "FA2 needs compute capability ≥ 8.0 (Ampere or newer)")
        self.reject(f"fa2-source {fa2}", "FA2 needs compute capability ≥ 8.0 (Ampere or newer)")
        self.reject(f"fa1-source {rules.FA1_VERSION}", "FA1 needs compute capability 7.5 (Turing) or newer")
        self.reject(f"fa3-source {rules.FA3_VERSION}", "FA3 is for Hopper GPUs (cc 9.0) only")
        self.reject(f"fa4 {rules.FA4_VERSION}", "FA4 needs compute capability ≥ 9.0 (8.x forward only)")
        return self.finish("sdpa", None, ())

    # --- Turing: FA1 ------------------------------------------------------------------------

    def _turing(self) -> Decision:
        fa2 = self.target or "(no target)"
        why_not_fa2 = "FA2 needs compute capability ≥ 8.0; Turing (7.5) needs FlashAttention 1.x"
        self.reject(f"fa2-wheel {fa2}", why_not_fa2)
        self.reject(f"fa2-source {fa2}", why_not_fa2)
        self.reject(f"fa3-source {rules.FA3_VERSION}", "FA3 is for Hopper GPUs (cc 9.0) only")
        self.reject(f"fa4 {rules.FA4_VERSION}", "FA4 needs compute capability ≥ 9.0 (8.x forward only)")
        problem = self._fa1_problem()
        if problem is None:
            toolkit = self.toolkit(rules.FA1_MIN_NVCC, f"flash-attn {rules.FA1_VERSION}", needs_blackwell=False)
            if toolkit.nvcc is not None:
                self.reject("sdpa", "FlashAttention 1.x supports Turing; SDPA is the fallback when it cannot")
                self.reasons.append(f"Turing GPU (cc 7.5): FA2 does not run on it, so build FlashAttention "
                                    f"{rules.FA1_VERSION} from source (1.x publishes no wheels)")
                self.reasons.append(toolkit.reason)
                steps = ("cuda-toolkit",) if toolkit.install else ()
                return self._decision("fa1-source", rules.FA1_VERSION, (*steps, "build-from-source", "verify"),
                                      toolkit=toolkit.install, build_nvcc=toolkit.nvcc, node_archs=(75,))
            problem = toolkit.reason
        self.reject(f"fa1-source {rules.FA1_VERSION}", problem)
        self.reasons.append(f"Turing GPU (cc 7.5): FlashAttention {rules.FA1_VERSION} cannot be built here "
                            f"({problem}); {SDPA_HINT}, which runs on Turing without installing anything")
        return self.finish("sdpa", None, ())

    def _fa1_problem(self) -> str | None:
        if not self.policy.source_builds:
            return "the policy forbids source builds and FlashAttention 1.x has no wheels"
        if python_mm(self.facts) < rules.FA1_PYTHON_FLOOR:
            return f"FlashAttention 1.x needs Python ≥ {rules.fmt_mm(rules.FA1_PYTHON_FLOOR)}"
        return None

    # --- Ampere and newer -------------------------------------------------------------------

    def _ampere_or_newer(self, ccs: tuple[tuple[int, int], ...]) -> Decision:
        if self.policy.prefer == "fastest":
            fastest = self._fastest()
            if fastest is not None:
                return fastest
        fa3 = self._try_fa3(ccs)
        if fa3 is not None:
            return fa3
        fa4 = self._try_fa4(ccs)
        if fa4 is not None:
            return fa4
        self.reject(f"fa1-source {rules.FA1_VERSION}", "FA2 supports this GPU; FA1 is only for Turing")
        if self.target is None:
            self.reasons.append("the catalog has no FA2 release and no --version was given: "
                                "pass --version or use a catalog with FA2 wheels")
            self.reject("fa2-wheel (no target)", "no FA2 release to target")
            self.reject("fa2-source (no target)", "no FA2 release to target")
            self.reject("sdpa", "not chosen silently: pick an FA2 release first")
            return self.finish("blocked", None, ())
        target = self.release_for_torch(self.target)
        if target is None:
            return self.finish("blocked", None, ())
        return self._fa2(target, ccs)

    def release_for_torch(self, target: str) -> str | None:
        """``target``, or — when the node's torch is older than its floor and no --version pinned it — the newest
        catalog release that supports that torch, said in the reasons. None (reasons and rejections added): no
        release fits, or the operator pinned one."""
        torch = self.facts.torch
        assert torch is not None
        have = rules.major_minor(torch.version)
        floor = rules.torch_floor(target)
        if have >= floor:
            return target
        why = (f"flash-attn {target} needs torch ≥ {rules.fmt_mm(floor)} (README \"PyTorch "
               f"{rules.fmt_mm(floor)} and above\"), the node has torch {torch.version}")
        older = [r for r in self.catalog.releases if rules.torch_floor(r) <= have
                 and rules.python_floor(r) <= python_mm(self.facts)]
        newest = max(older, key=rules._v) if older else None
        self.reject(f"fa2-wheel {target}", why)
        self.reject(f"fa2-source {target}", why)
        if self.policy.version is None and newest is not None:
            self.reasons.append(f"{why}: planning flash-attn {newest}, the newest release that supports torch "
                                f"{rules.fmt_mm(have)}; upgrade torch to ≥ {rules.fmt_mm(floor)} to get {target}")
            return newest
        hint = f" or pass --version {newest}" if newest is not None else ""
        self.reasons.append(f"{why}: upgrade torch to ≥ {rules.fmt_mm(floor)}{hint}")
        self.reject("sdpa", "not chosen silently: the policy keeps the target release")
        return None

    def _fa2(self, target: str, ccs: tuple[tuple[int, int], ...]) -> Decision:
        f = self.facts
        torch = f.torch
        assert torch is not None and torch.cuda is not None
        floor = rules.python_floor(target)
        if python_mm(f) < floor:
            why = (f"flash-attn {target} requires Python ≥ {rules.fmt_mm(floor)} (python_requires) but the "
                   f"target Python is {f.python.version}")
            self.reasons.append(f"{why}: use a newer Python for torch, or pass --version with an older release")
            self._reject_fa2_wheels(target, ccs, why)
            self.reject(f"fa2-source {target}", why)
            self.reject("sdpa", "not chosen silently: the policy keeps the target release")
            return self.finish("blocked", None, ())
        if any(cc[0] >= 10 for cc in ccs) and not rules.runtime_supports_blackwell(target):
            why = (f"flash-attn {target} rejects Blackwell GPUs at runtime (≤ 2.7.2 checks is_sm90 || is_sm8x; "
                   "fixed in 2.7.3)")
            self.reasons.append(f"{why}: pass --version 2.8.0 or newer (wheels with sm_100/sm_120), or --fa4")
            self._reject_fa2_wheels(target, ccs, why)
            self.reject(f"fa2-source {target}", why)
            self.reject("sdpa", "not chosen silently: the policy keeps the target release")
            return self.finish("blocked", None, ())
        node_archs = tuple(sorted({a for cc in ccs if (a := rules.best_sass(rules.source_archs(target), cc))}))
        unsupported = [cc for cc in ccs if rules.best_sass(rules.source_archs(target), cc) is None]
        if unsupported:
            why = (f"flash-attn {target} has no kernels for cc {', '.join(rules.fmt_mm(c) for c in unsupported)} "
                   f"(it builds {arch_label(rules.source_archs(target))})")
            self._reject_fa2_wheels(target, ccs, why)
            self.reject(f"fa2-source {target}", why)
            self.reasons.append(f"{why}; {SDPA_HINT}" + ("" if self.policy.fa4 else ", or try --fa4"))
            return self.finish("sdpa", None, ())

        query = wheel_query(f)
        wheel, why_no_wheel = pick_wheel(self.catalog, target, query)
        self._reject_other_releases(target, query)
        if wheel is not None:
            self.reasons.append(f"prebuilt wheel {wheel.filename} matches flash-attn {target}, "
                                f"{query.describe()}, glibc ≥ {wheel.min_glibc or 'unknown'} and carries "
                                f"{arch_label(wheel.cuda_archs)} (from {wheel.origin}): install it by "
                                "path/URL, no compiler needed")
            self.reject(f"fa2-source {target}", "a matching prebuilt wheel exists; building takes far longer")
            self.reject("sdpa", f"flash-attn {target} is available for this node")
            return self._decision("fa2-wheel", target, ("install-wheel", "verify"), artifact=wheel)

        self.reject(f"fa2-wheel {target}", why_no_wheel)
        if f.python.free_threaded:
            self.reasons.append(f"free-threaded Python ({f.python.abi}): upstream publishes no {f.python.abi} wheels "
                                "(its release matrix builds cpXY GIL wheels only) and pip refuses cpXY wheels on it; "
                                "a source build compiles the extension for this interpreter (torch ships "
                                "free-threaded builds from 2.6 on, experimental)")
        if not self.policy.source_builds:
            self.reasons.append(f"no prebuilt flash-attn {target} wheel fits ({why_no_wheel}) and the policy "
                                "forbids source builds: add a wheel to the catalog or allow source builds")
            self.reject(f"fa2-source {target}", "the policy forbids source builds")
            self.reject("sdpa", "not chosen silently: the policy keeps the target release")
            return self.finish("blocked", None, ())
        toolkit = self.toolkit(rules.min_nvcc(target), f"flash-attn {target}",
                                needs_blackwell=rules.needs_blackwell_nvcc(node_archs))
        if toolkit.nvcc is None:
            self.reject(f"fa2-source {target}", toolkit.reason)
            self.reject("sdpa", "not chosen silently: the policy keeps the target release")
            self.reasons.append(f"no prebuilt wheel fits ({why_no_wheel}) and a source build is impossible: "
                                f"{toolkit.reason}")
            return self.finish("blocked", None, ())
        self.reject("sdpa", f"flash-attn {target} can be built for this node")
        self.reasons.append(f"no prebuilt flash-attn {target} wheel fits this node ({why_no_wheel}): build it "
                            f"from source for {arch_label(node_archs)} only")
        self.reasons.append(toolkit.reason)
        steps = ("cuda-toolkit",) if toolkit.install else ()
        return self._decision("fa2-source", target, (*steps, "build-from-source", "verify"), toolkit=toolkit.install,
                              build_nvcc=toolkit.nvcc, node_archs=node_archs)

    def _reject_fa2_wheels(self, target: str, ccs: tuple[tuple[int, int], ...], why: str) -> None:
        self.reject(f"fa2-wheel {target}", why)
        if self.facts.torch is not None and self.facts.torch.cuda is not None:
            self._reject_other_releases(target, wheel_query(self.facts))

    def _reject_other_releases(self, target: str, query: WheelQuery) -> None:
        for candidate, reason in _other_releases(self.catalog, target, query):
            self.reject(candidate, reason)

    # --- toolkit (DESIGN §3.2 rule 5) -------------------------------------------------------

    def toolkit(self, release_floor: tuple[int, int], what: str, *, needs_blackwell: bool) -> Toolkit:
        f = self.facts
        assert f.torch is not None and f.torch.cuda is not None and f.driver is not None
        torch_cuda = rules.major_minor(f.torch.cuda)
        driver_max = rules.major_minor(f.driver.cuda_max)
        floor = max(release_floor, rules.BLACKWELL_MIN_NVCC) if needs_blackwell else release_floor
        floor_why = f"{what} needs nvcc ≥ {rules.fmt_mm(release_floor)}" + (
            "; sm_100/sm_120 need nvcc ≥ 12.8" if needs_blackwell else "")
        have = rules.major_minor(f.toolkit.nvcc) if f.toolkit else None
        if have is not None:
            problems = _toolkit_problems(have, torch_cuda, driver_max, floor, floor_why)
            if not problems:
                return Toolkit(have, None, f"nvcc {rules.fmt_mm(have)} qualifies: same major as torch's CUDA "
                                f"{f.torch.cuda}, ≤ the driver's CUDA {f.driver.cuda_max}, ≥ "
                                f"{rules.fmt_mm(floor)}")
            current = f"the node's nvcc {rules.fmt_mm(have)} does not qualify ({'; '.join(problems)})"
        else:
            current = "the node has no nvcc"
        wanted = min(torch_cuda, driver_max)
        if wanted < floor and floor[0] == torch_cuda[0] and floor <= driver_max:
            wanted = floor
        problems = _toolkit_problems(wanted, torch_cuda, driver_max, floor, floor_why)
        if problems:
            return Toolkit(None, None, f"{current}, and no CUDA toolkit can qualify: {'; '.join(problems)} "
                            f"(torch CUDA {f.torch.cuda}, driver max {f.driver.cuda_max}); upgrade the driver or "
                            "install a torch built for a newer CUDA")
        lower = " (the driver's maximum, lower than torch's CUDA)" if wanted == driver_max < torch_cuda else ""
        return Toolkit(wanted, rules.fmt_mm(wanted), f"{current}: install CUDA toolkit {rules.fmt_mm(wanted)}"
                        f"{lower} to match torch's CUDA {f.torch.cuda} within the driver's maximum "
                        f"{f.driver.cuda_max}")

    # --- --prefer fastest: the measured ranking decides, the compatible rules install ---------

    def _fastest(self) -> Decision | None:
        """The fastest measured implementation this node may install, planned by the ordinary rules; None
        (with a reason) when nothing measured can be had, so the compatible default plans instead."""
        m = self.measured
        what = f"--prefer fastest ({self.policy.workload})"
        if m is None or not m.ranked:
            why = m.notes[0] if m is not None and m.notes else "no measurements were given"
            self.reasons.append(f"{what}: no measured ranking of correct implementations for this node ({why}); "
                                "planning the compatible default")
            return None
        tried: dict[str, str] = {}  # family → why it could not be had
        for x in m.ranked:
            family = _FAMILY.get(x.impl)
            if family is None or family in tried:
                continue
            sub: Decision | None
            if family == "sdpa":
                sub = None
            elif family == "fa3" and not self.policy.fa3:
                tried[family] = "FA3 stays opt-in under --prefer fastest (a beta multi-hour source build): add --fa3"
                continue
            else:
                base = Policy(version=self.policy.version, fa3=family == "fa3", fa4=family == "fa4",
                              source_builds=self.policy.source_builds)
                sub = _Resolution(self.facts, self.catalog, base).decide()
                if not sub.variant.startswith(family):
                    tried[family] = next((r.reason for r in sub.rejected if r.candidate.startswith(family)),
                                         "; ".join(sub.reasons[-1:]) or f"the rules plan {sub.variant} instead")
                    continue
            return self._fastest_decision(x, sub, tried)
        self.reasons.append(f"{what}: none of the measured implementations can be had here "
                            f"({'; '.join(f'{k}: {v}' for k, v in tried.items())}); planning the compatible default")
        return None

    def _fastest_decision(self, chosen: MeasuredImpl, sub: Decision | None, tried: dict[str, str]) -> Decision:
        m = self.measured
        assert m is not None
        family = _FAMILY[chosen.impl]
        others = [x for x in m.ranked if _FAMILY.get(x.impl) != family]
        runner = others[0] if others else None
        margin = f", {(chosen.value / runner.value - 1) * 100:+.0f} % over {runner.impl} ({runner.value:.0f})" if (
            runner is not None and runner.value) else ""
        head = [f"--prefer fastest ({m.workload}): {chosen.impl} is the fastest measured implementation this node "
                f"may install: {chosen.value:.0f} {m.unit} ({chosen.source}, median of {chosen.shapes} shapes)"
                f"{margin}"]
        if chosen.setting:
            head.append(f"use it with: {chosen.setting}")
        for fam, why in tried.items():
            best = next(x for x in m.ranked if _FAMILY.get(x.impl) == fam)
            head.append(f"{best.impl} measured faster ({best.value:.0f} {m.unit}) but cannot be had here: {why}")

        def measured_reason(candidate: str, fallback: str) -> str:
            fam = _FAMILY.get(candidate.split(" ", 1)[0].split("-", 1)[0], "sdpa" if candidate == "sdpa" else "")
            best = next((x for x in m.ranked if _FAMILY.get(x.impl) == fam), None)
            if fam in tried and best is not None:
                return f"measured {best.value:.0f} {m.unit} ({best.source}) but cannot be had here: {tried[fam]}"
            if best is None:
                return (f"not measured for this GPU ({m.workload}): --prefer fastest plans only measured "
                        f"implementations" if fam in ("fa2", "fa3", "fa4") else fallback)
            slower = (1 - best.value / chosen.value) * 100 if chosen.value else 0.0
            return (f"measured {best.value:.0f} {m.unit} ({best.impl}, {best.source}), {slower:.0f} % slower than "
                    f"{chosen.impl}'s {chosen.value:.0f}")

        if sub is None:  # SDPA wins: nothing to install
            head.append("nothing to install: SDPA ships with torch"
                        + (f" (the installed flash-attn {self.facts.flash_attn.version} stays)"
                           if self.facts.flash_attn else ""))
            fa2 = self.target or "(no target)"
            for cand in (f"fa2-wheel {fa2}", f"fa2-source {fa2}", f"fa4 {rules.FA4_VERSION}",
                         f"fa3-source {rules.FA3_VERSION}", f"fa1-source {rules.FA1_VERSION}"):
                self.reject(cand, measured_reason(cand, "not measured"))
            self.reasons[:0] = head
            return self.finish("sdpa", None, ())
        rejected = tuple(r if r.candidate.split(" ", 1)[0].startswith(family)
                         else Rejected(r.candidate, measured_reason(r.candidate, r.reason)) for r in sub.rejected)
        return replace(sub, reasons=(*self.reasons, *head, *sub.reasons), rejected=rejected)

    # --- FA3 and FA4 (only when the policy asks) --------------------------------------------

    def _try_fa3(self, ccs: tuple[tuple[int, int], ...]) -> Decision | None:
        candidate = f"fa3-source {rules.FA3_VERSION}"
        if not self.policy.fa3:
            self.reject(candidate, "FA3 is opt-in (--fa3 or policy fa3): beta, Hopper only, source build only")
            return None
        if any(cc != (9, 0) for cc in ccs):
            self.reject(candidate, "FA3 (hopper/) runs on Hopper GPUs (cc 9.0) only")
            return None
        problem = None
        if not self.policy.source_builds:
            problem = "FA3 has no release wheels and the policy forbids source builds"
        elif python_mm(self.facts) < rules.FA3_PYTHON_FLOOR:
            problem = f"FA3 needs Python ≥ {rules.fmt_mm(rules.FA3_PYTHON_FLOOR)}"
        toolkit = None
        if problem is None:
            toolkit = self.toolkit(rules.FA3_MIN_NVCC, "FA3", needs_blackwell=False)
            if toolkit.nvcc is None:
                problem = toolkit.reason
        if problem is not None or toolkit is None or toolkit.nvcc is None:
            self.reject(candidate, problem or "FA3 cannot be built here")
            self.reasons.append(f"FA3 was requested but cannot be used here ({problem}); planning FA2 instead")
            return None
        fa2 = self.target or "(no target)"
        self.reject(f"fa2-wheel {fa2}", "the policy asks for FA3 on Hopper")
        self.reject(f"fa2-source {fa2}", "the policy asks for FA3 on Hopper")
        self.reject(f"fa1-source {rules.FA1_VERSION}", "FA1 is only for Turing")
        self.reject(f"fa4 {rules.FA4_VERSION}", "the policy asks for FA3 on Hopper, which takes precedence")
        self.reject("sdpa", "FA3 can be built for this Hopper node")
        self.reasons.append("the policy asks for FA3 and every GPU is Hopper (cc 9.0): build hopper/ from source "
                            "(no release wheels); without nvcc 12.8 or ≥ 13.0 its setup.py downloads nvcc/ptxas, so "
                            "offline nodes need FLASH_ATTENTION_OFFLINE_BUILD=1 and a local toolchain")
        self.reasons.append(toolkit.reason)
        steps = ("cuda-toolkit",) if toolkit.install else ()
        return self._decision("fa3-source", rules.FA3_VERSION, (*steps, "build-from-source", "verify"),
                              toolkit=toolkit.install, build_nvcc=toolkit.nvcc, node_archs=(90,))

    def _try_fa4(self, ccs: tuple[tuple[int, int], ...]) -> Decision | None:
        candidate = f"fa4 {rules.FA4_VERSION}"
        if not self.policy.fa4:
            self.reject(candidate, "FA4 is opt-in (--fa4 or policy fa4): beta releases only")
            return None
        f = self.facts
        assert f.torch is not None and f.torch.cuda is not None and f.driver is not None
        problems = []
        if any(cc[0] < 9 for cc in ccs):
            problems.append("FA4 runs forward and backward on cc 9.x–12.x only (8.x is forward only)")
        elif any(cc[0] > 12 for cc in ccs):
            problems.append("FA4 supports cc 9.x–12.x")
        if python_mm(f) < rules.FA4_PYTHON_FLOOR:
            problems.append(f"FA4 needs Python ≥ {rules.fmt_mm(rules.FA4_PYTHON_FLOOR)}")
        if version_tuple(f.driver.version) < version_tuple(rules.FA4_MIN_DRIVER):
            problems.append(f"nvidia-cutlass-dsl needs driver ≥ {rules.FA4_MIN_DRIVER} (found {f.driver.version})")
        cuda_major = rules.major_minor(f.torch.cuda)[0]
        if cuda_major not in (12, 13):
            problems.append(f"FA4 needs a CUDA 12 or 13 torch (found CUDA {f.torch.cuda})")
        if problems:
            self.reject(candidate, "; ".join(problems))
            self.reasons.append(f"FA4 was requested but cannot be used here ({'; '.join(problems)}); "
                                "planning FA2 instead")
            return None
        fa2 = self.target or "(no target)"
        self.reject(f"fa2-wheel {fa2}", "the policy asks for FA4")
        self.reject(f"fa2-source {fa2}", "the policy asks for FA4")
        self.reject(f"fa1-source {rules.FA1_VERSION}", "FA1 is only for Turing")
        self.reject("sdpa", "FA4 supports this GPU")
        extra = "[cu13]" if cuda_major == 13 else ""
        self.reasons.append(f"the policy asks for FA4 and it supports this GPU: pip install "
                            f"\"flash-attn-4{extra}=={rules.FA4_VERSION}\" (pure Python, kernels JIT-compiled by "
                            "CuTe DSL at run time, no nvcc needed)")
        return self._decision("fa4", rules.FA4_VERSION, ("install-wheel", "verify"))


# --- helpers (pure, some cached) ---------------------------------------------------------------

def _generation(variant: str) -> str | None:
    """'fa2-wheel' → 'fa2'; an unknown label → None (compare versions only)."""
    head = variant.split("-", 1)[0]
    return head if head in ("fa1", "fa2", "fa3", "fa4") else None


def _toolkit_problems(nvcc: tuple[int, int], torch_cuda: tuple[int, int], driver_max: tuple[int, int],
                      floor: tuple[int, int], floor_why: str) -> list[str]:
    problems = []
    if nvcc[0] != torch_cuda[0]:
        problems.append(f"nvcc {rules.fmt_mm(nvcc)} major differs from torch's CUDA {rules.fmt_mm(torch_cuda)} "
                        "(torch's cpp_extension refuses the build)")
    if nvcc > driver_max:
        problems.append(f"nvcc {rules.fmt_mm(nvcc)} is newer than the driver's maximum CUDA {rules.fmt_mm(driver_max)}")
    if nvcc < floor:
        problems.append(f"nvcc {rules.fmt_mm(nvcc)} is too old: {floor_why}")
    return problems


@lru_cache(maxsize=4096)
def _other_releases(catalog: Catalog, target: str, query: WheelQuery) -> tuple[tuple[str, str], ...]:
    """Every other catalog release's wheel, grouped by why it lost: fits-but-not-target, or no fit."""
    fits: list[str] = []
    no_fit: list[str] = []
    for release in catalog.releases:
        if release == target:
            continue
        wheel, _ = pick_wheel(catalog, release, query)
        (fits if wheel is not None else no_fit).append(release)
    out = []
    if fits:
        out.append((f"fa2-wheel {', '.join(fits)}",
                    f"a wheel fits this node, but the policy keeps the target {target} "
                    f"(pass --version {fits[-1]} to choose one)"))
    if no_fit:
        out.append((f"fa2-wheel {', '.join(no_fit)}", f"not the target {target}, and no wheel fits this node"))
    return tuple(out)

"""Every plan variant on the real path: rollout → verify → rollback → rollout again, through a real controller, real
`fleet-agent --simulate PROFILE --executor ansible` processes (GPU facts from a profile, labelled simulated; the
target venv's Python probed for real; playbooks and pip for real) and FakeUpstream serving the stand-in universes.

One controller for the module; one agent and one target venv per variant:

- ``fa2-wheel`` (h200 profile: torch 2.8 cu12 cxx11abiTRUE): the release wheel, in the user catalog at its GitHub
  URL, fetched by the controller through ``--wheel-mirror`` from the fake releases, plus its closure (einops);
  the venv has no pip (pip runs from the wheel the controller sends);
- ``fa2-source`` (h100-cu130: no release wheel for torch 2.11 cu13): the sdist from the fake index, built with the
  stand-in backend, the built wheel up to the store and installed with its closure;
- ``fa1-source`` (t4): FlashAttention 1.0.9's sdist;
- ``fa4`` (h100-cu130, ``--fa4``): ``flash-attn-4[cu13]`` and its whole closure for the venv's Python/platform;
- ``sdpa`` (v100) and ``blocked`` (cpu-only torch): skipped, nothing installed.

The FA2/FA1/blocked/sdpa nodes share one rollout, the FA4 node has its own (``--fa4``), both run at once. Verify
runs the real benchmark in the target venv with the stand-in torch: no GPU there, so it fails, and says so — the
node ends ``failed`` at verify, after a successful install (no pass is faked). Rollback then removes flash-attn
(the nodes had none; in the venv without pip too), leaving the dependencies it brought (pip uninstall of
flash-attn only), and a second rollout installs it again, from the store (nothing more from upstream). The agents
run with HTTP(S) proxies pointing at a closed port: every file reached them from the controller.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from fleetctl.controller.catalog import add_user_wheels, parse_catalog_json
from tests.integration.harness.upstream import (
    EINOPS_VERSION,
    TORCH_STANDIN_VERSION,
    TVM_FFI_DECOY_VERSION,
    fa4_closure,
)
from tests.integration.realnode.rig import (
    FA1,
    FA2,
    FA4,
    AgentProc,
    Controller,
    Result,
    TargetVenv,
    TimedUpstream,
    Universes,
    catalog_entry,
    make_universes,
    require_ansible,
    running,
    utc,
)

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Node:
    variant: str
    hostname: str
    profile: str
    with_pip: bool   # the fa2-wheel venv has none: pip runs from the wheel the controller sends along


NODES = (Node("fa2-wheel", "rn-fa2-wheel", "h200", False), Node("fa2-source", "rn-fa2-source", "h100-cu130", True),
         Node("fa1-source", "rn-fa1-source", "t4", True), Node("fa4", "rn-fa4", "h100-cu130", True),
         Node("sdpa", "rn-sdpa", "v100", False), Node("blocked", "rn-blocked", "cpu-only-torch", False))
BY_VARIANT = {n.variant: n for n in NODES}
#: installing variants → (distribution, version)
INSTALLS = {"fa2-wheel": ("flash-attn", FA2), "fa2-source": ("flash-attn", FA2), "fa1-source": ("flash-attn", FA1),
            "fa4": ("flash-attn-4", FA4)}
PHASES = ("first", "rollback", "again")


@dataclass
class Phase:
    outputs: dict[str, Result] = field(default_factory=dict)            # fa2|fa4 → fleetctl's output
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)   # fa2|fa4 → `rollout status --json`
    installed: dict[str, dict[str, str]] = field(default_factory=dict)  # variant → what its venv holds
    file_gets: int = 0                                                  # upstream GETs of files so far


@dataclass
class Matrix:
    controller: Controller
    upstream: TimedUpstream
    universes: Universes
    venvs: dict[str, TargetVenv]
    before: dict[str, dict[str, str]] = field(default_factory=dict)
    dry_run: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, Phase] = field(default_factory=dict)
    verify_after_rollback: Result | None = None
    pip_check_after_rollback: dict[str, str] = field(default_factory=dict)   # variant → `pip check` output
    jobs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # hostname → its jobs, oldest first

    def node(self, phase: str, variant: str) -> dict[str, Any]:
        st = self.phases[phase].rollouts["fa4" if variant == "fa4" else "fa2"]
        found: dict[str, Any] = next(n for n in st["nodes"] if n["hostname"] == BY_VARIANT[variant].hostname)
        return found

    def transitions(self, phase: str, variant: str) -> list[dict[str, Any]]:
        st = self.phases[phase].rollouts["fa4" if variant == "fa4" else "fa2"]
        return [t for t in st["transitions"] if t["hostname"] == BY_VARIANT[variant].hostname]

    def why(self, phase: str, variant: str) -> str:
        """What to read when an assertion fails: fleetctl's output, the node's transitions, the controller log."""
        out = self.phases[phase].outputs["fa4" if variant == "fa4" else "fa2"].out
        steps = "\n".join(f"  {t['from']} → {t['to']}: {t['cause']}" for t in self.transitions(phase, variant))
        return f"\n--- fleetctl ---\n{out[-3000:]}\n--- transitions ---\n{steps}\n--- controller ---\n" \
               f"{self.controller.log_tail(20)}"

    def installs(self, variant: str) -> list[dict[str, Any]]:
        return [j for j in self.jobs[BY_VARIANT[variant].hostname] if j["kind"] == "install-wheel"]


def _rollout(*hosts: str, fa4: bool = False) -> list[str]:
    return ["rollout", "flash-attn", "--version", FA2, "--nodes", ",".join(hosts), "--canary", "0", "--batch",
            "100%", "--max-failures", "100%", "--verify-mode", "quick", *(["--fa4"] if fa4 else [])]


def _rid(res: Result) -> str:
    for line in res.out.splitlines():
        if line.startswith("rollout ") and " started by " in line:
            return line.split()[1]
    raise AssertionError(f"no rollout started (exit {res.rc}):\n{res.out}")


def _file_gets(up: TimedUpstream) -> int:
    return sum(1 for m, p in up.requests if m == "GET" and p.startswith(("/files/", "/releases/")))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    require_ansible()
    root = tmp_path_factory.mktemp("realnode-matrix")
    universes = make_universes(root / "universes")
    up = TimedUpstream(root=root / "upstream")
    with up:
        for u in (universes.fa2, universes.fa1, universes.fa4):
            up.publish(u)
        c = Controller(root / "controller", up)
        # the release wheel: a user catalog entry at its GitHub URL (--wheel-mirror maps it to the fake releases)
        add_user_wheels(c.state, parse_catalog_json({"wheels": [catalog_entry(universes.release_wheel)]}, "user",
                                                    "matrix"))
        venvs = {n.variant: TargetVenv.make(root / "venvs" / n.variant, universes.torch, with_pip=n.with_pip)
                 for n in NODES}
        agents = [AgentProc(c, n.hostname, n.profile, venvs[n.variant], root / "nodes" / n.hostname) for n in NODES]
        m = Matrix(c, up, universes, venvs, before={v: venv.versions() for v, venv in venvs.items()})
        with running(c, agents):
            fa2_hosts = [n.hostname for n in NODES if n.variant != "fa4"]
            fa4_host = BY_VARIANT["fa4"].hostname
            dry = c.fleetctl(*_rollout(*fa2_hosts), "--dry-run", "--json")
            assert dry.rc == 0, dry.out + dry.err
            m.dry_run = dry.json()
            rids: dict[str, str] = {}
            for name in PHASES:
                phase = m.phases[name] = Phase()
                if name == "rollback":
                    fa2, fa4 = c.together(["rollout", "rollback", rids["fa2"]], ["rollout", "rollback", rids["fa4"]])
                else:
                    fa2, fa4 = c.together(_rollout(*fa2_hosts), _rollout(fa4_host, fa4=True))
                    rids = {"fa2": _rid(fa2), "fa4": _rid(fa4)}
                phase.outputs = {"fa2": fa2, "fa4": fa4}
                phase.rollouts = {k: c.rollout(rid) for k, rid in rids.items()}
                phase.installed = {v: venv.versions() for v, venv in venvs.items()}
                phase.file_gets = _file_gets(up)
                if name == "rollback":  # what a verification expects of the nodes now: no flash-attn (sdpa)
                    m.pip_check_after_rollback = {v: venvs[v].pip_check() for v in INSTALLS}
                    m.verify_after_rollback = c.fleetctl("verify", "--quick", "--json",
                                                         *(BY_VARIANT[v].hostname for v in INSTALLS))
            m.jobs = {n.hostname: c.jobs(n.hostname) for n in NODES}
            yield m


# ---- the installing variants ---------------------------------------------------------------------


def _closure(variant: str) -> dict[str, str]:
    """What the venv must hold after an install (torch aside)."""
    if variant == "fa4":
        return {(parts := name.split("-"))[0].replace("_", "-"): parts[1] for name in fa4_closure(FA4)}
    if variant == "fa2-wheel":
        return {"flash-attn": FA2, "einops": EINOPS_VERSION}   # the release wheel requires einops
    return {"flash-attn": INSTALLS[variant][1]}                 # the stand-in build's wheel requires torch only


@pytest.mark.parametrize("variant", list(INSTALLS))
def test_rollout_verify_rollback_rollout_again(matrix: Matrix, variant: str) -> None:
    node = BY_VARIANT[variant]
    dist, version = INSTALLS[variant]
    venv = matrix.venvs[variant]
    assert matrix.before[variant] == {"torch": TORCH_STANDIN_VERSION,
                                      **({"pip": matrix.before[variant]["pip"]} if node.with_pip else {})}
    for name in ("first", "again"):
        n, why = matrix.node(name, variant), matrix.why(name, variant)
        assert n["variant"] == variant, why
        causes = [t["cause"] for t in matrix.transitions(name, variant)]
        assert "install-wheel succeeded" in causes, why
        got = matrix.phases[name].installed[variant]
        assert {d: got.get(d) for d in _closure(variant)} == _closure(variant), (got, why)
        assert got["torch"] == TORCH_STANDIN_VERSION, got              # never touched
        assert got.get("pip") == matrix.before[variant].get("pip")     # pip is not installed where there was none
        # verify: the real benchmark in the target venv; no GPU here, so it fails and says why (no faked pass)
        assert n["state"] == "failed", why
        assert n["cause"].startswith("verification failed") and "torch.cuda.is_available() is False" in n["cause"], why
    first, again = matrix.installs(variant)
    for job in (first, again):
        iw = job["result"]["install_wheel"]
        assert iw["dist"] == dist and iw["version"].split("+")[0] == version and iw["pip_check"] == "ok", iw
        assert iw["pip_bootstrapped"] is (not node.with_pip), iw
    assert first["result"]["install_wheel"]["previous_version"] is None
    assert again["result"]["install_wheel"]["previous_version"] is None   # the rollback removed it
    builds = [j for j in matrix.jobs[node.hostname] if j["kind"] == "build-from-source"]
    if variant.endswith("-source"):
        (build,) = builds                      # built once; the second rollout installs the stored wheel
        assert build["result"]["built_wheel"]["artifact_sha256"] == first["vars"]["wheel_sha256"] \
            == again["vars"]["wheel_sha256"]
        (b,) = [b for b in matrix.phases["first"].rollouts["fa2"]["builds"] if b["builder"] == node.hostname]
        assert b["status"] == "succeeded" and b["artifact_sha256"] == first["vars"]["wheel_sha256"], b
    else:
        assert builds == []
    venv.pip_check()

    # rollback: the node had no flash-attn before the rollout, so it is removed; torch untouched
    rb, why = matrix.node("rollback", variant), matrix.why("rollback", variant)
    assert rb["state"] == "rolled-back" and "removed" in rb["cause"], why
    (job,) = [j for j in matrix.jobs[node.hostname] if j["kind"] == "rollback"]
    assert job["result"]["rollback"]["action"] == "removed", job["result"]
    after = matrix.phases["rollback"].installed[variant]
    assert dist not in after and after["torch"] == TORCH_STANDIN_VERSION, after
    assert "No broken requirements found" in matrix.pip_check_after_rollback[variant]
    # …and that is what the node is expected to have now: a verification expects SDPA, not flash-attn
    res = matrix.verify_after_rollback
    assert res is not None
    (ver,) = [v for v in res.json()["verifications"] if v["hostname"] == node.hostname]
    assert ver["expect"] == "sdpa", ver


def test_dry_run_says_where_each_artifact_comes_from(matrix: Matrix) -> None:
    plan = {n["hostname"]: n for n in matrix.dry_run["nodes"]}
    wheel = matrix.universes.release_wheel.name
    items = {(i["what"], i["availability"]): i for i in plan[BY_VARIANT["fa2-wheel"].hostname]["preflight"]}
    fetch = items[("flash-attn wheel", "fetch")]
    assert fetch["name"] == wheel and fetch["source"] == f"{matrix.upstream.releases_url}/v{FA2}/{wheel}", items
    assert items[("dependencies", "resolve")]["source"].endswith(matrix.upstream.index_url)
    sdist = {i["what"]: i for i in plan[BY_VARIANT["fa2-source"].hostname]["preflight"]}["sdist"]
    assert (sdist["name"], sdist["availability"]) == (f"flash_attn-{FA2}.tar.gz", "fetch"), sdist
    for v in ("sdpa", "blocked"):
        assert plan[BY_VARIANT[v].hostname]["variant"] == v


def test_artifacts_reached_the_nodes_only_through_the_controller(matrix: Matrix) -> None:
    up, u = matrix.upstream, matrix.universes
    # each file once, by the controller (einops is in two closures resolved at the same time: once or twice);
    # the decoy outside flash-attn-4's bounds never
    wanted = [u.release_wheel.name, f"flash_attn-{FA2}.tar.gz", f"flash_attn-{FA1}.tar.gz", *fa4_closure(FA4)]
    einops = f"einops-{EINOPS_VERSION}-py3-none-any.whl"
    assert {f: up.fetched(f) for f in wanted if f != einops} == dict.fromkeys(set(wanted) - {einops}, 1)
    assert up.fetched(einops) in (1, 2)
    assert up.fetched(f"apache_tvm_ffi-{TVM_FFI_DECOY_VERSION}-py3-none-any.whl") == 0
    # rolling out again after the rollback took everything from the store
    assert matrix.phases["again"].file_gets == matrix.phases["rollback"].file_gets == \
        matrix.phases["first"].file_gets
    gets = [(t, p.rsplit("/", 1)[-1]) for t, m, p in up.timed if m == "GET"]
    for variant in INSTALLS:
        host = BY_VARIANT[variant].hostname
        for job in matrix.jobs[host]:
            if job["kind"] not in ("install-wheel", "build-from-source"):
                continue
            fetched = [e["data"]["file"] for e in job["events"] if e["event"] == "fleet_artifact_fetch"]
            assert fetched, job["id"]
            wanted_now = {"install-wheel": job["vars"].get("wheel_filename"),
                          "build-from-source": f"flash_attn-{INSTALLS[variant][1]}.tar.gz"}[job["kind"]]
            assert wanted_now in fetched, (job["kind"], fetched)
            # whatever upstream served of these files, it served before the node's job existed (a later GET of
            # the same file is another node's closure being resolved at the same time, e.g. einops for FA4)
            created = utc(job["created_at"])
            served = {urllib.parse.unquote(f) for _, f in gets} & set(fetched)
            late = sorted(f for f in served
                          if not any(t < created and urllib.parse.unquote(g) == f for t, g in gets))
            assert not late, (host, job["kind"], late)
    deps = {e["data"]["file"] for e in matrix.installs("fa4")[0]["events"] if e["event"] == "fleet_artifact_fetch"}
    assert fa4_closure(FA4) <= deps, deps


@pytest.mark.parametrize("variant", ["sdpa", "blocked"])
def test_skipped_variant_installs_nothing(matrix: Matrix, variant: str) -> None:
    node = BY_VARIANT[variant]
    for name in PHASES:
        n = matrix.node(name, variant)
        assert n["state"] == "skipped" and n["variant"] == variant, n
        assert matrix.phases[name].installed[variant] == {"torch": TORCH_STANDIN_VERSION}
    assert matrix.jobs[node.hostname] == []

"""Bad upstream input on the real path: the node fails with a clear cause naming the file and the fix, nothing is
half-installed on it nor half-stored in the controller, and after the fix `fleetctl rollout resume ID
--retry-failed` converges (the install succeeds; verify then fails for want of a GPU, as everywhere here).

One controller and one `fleet-agent --simulate h200 --executor ansible` node for the module. Each test rolls out
its own flash-attn release (its own release wheel, so the controller's store-first lookup never hides the fault);
``--max-failures 0`` pauses the rollout at the first failure so it can be resumed, and the test aborts it at the
end. Faults: the release wheel answers 404; the download is cut halfway; the index advertises a wrong sha256 for a
dependency; upstream goes down while the controller is downloading the wheel.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleetctl.controller.catalog import add_user_wheels, parse_catalog_json
from tests.integration.harness.upstream import (
    TORCH_STANDIN_VERSION,
    WHEEL_PLATFORM,
    FakeUpstream,
    fa2_universe,
    local_python_tag,
    torch_wheel,
)
from tests.integration.harness.wheels import sha256_file, wheel_bytes
from tests.integration.realnode.rig import (
    FA2_CUDA,
    FA2_TORCH,
    AgentProc,
    Controller,
    Result,
    TargetVenv,
    TimedUpstream,
    catalog_entry,
    require_ansible,
    running,
)

pytestmark = pytest.mark.timeout(600)

HOST = "rn-faults"
#: one release per test (each with its own release wheel)
VERSIONS = {"404": "2.8.2", "truncate": "2.8.1", "sha": "2.8.0", "down": "2.7.4"}
DEP = "fleet-standin-dep"   # a dependency only the "sha" release has: the store cannot already hold it
DEP_WHEEL = "fleet_standin_dep-1.0.0-py3-none-any.whl"


@dataclass
class Rig:
    controller: Controller
    upstream: FakeUpstream
    venv: TargetVenv
    agent: AgentProc
    wheels: dict[str, Path] = field(default_factory=dict)      # version → its release wheel (this Python)
    dep: Path | None = None

    def rollout(self, version: str, *extra: str) -> Result:
        return self.controller.fleetctl("rollout", "flash-attn", "--version", version, "--nodes", HOST, "--canary",
                                        "0", "--batch", "100%", "--max-failures", "0", "--verify-mode", "quick",
                                        *extra)

    def node(self, rid: str) -> dict[str, object]:
        (n,) = self.controller.rollout(rid)["nodes"]
        return dict(n)

    def rollout_jobs(self, rid: str) -> list[str]:
        """The kinds of the jobs this rollout sent the node (drift re-verifications are not its own)."""
        return [j["kind"] for j in self.controller.api("/jobs", node=HOST, limit=1000)["jobs"]
                if (j["vars"] or {}).get("rollout_id") == rid]

    def stored(self, filename: str) -> list[dict[str, object]]:
        return [a for a in self.controller.artifacts() if a["filename"] == filename]

    def partial_files(self) -> list[Path]:
        """Anything in the controller's artifact directory that is not a committed artifact."""
        root = self.controller.state / "artifacts"
        committed = {str(a["sha256"]) for a in self.controller.artifacts()}
        return [p for p in root.rglob("*") if p.is_file() and not any(sha in str(p) for sha in committed)]

    def converge(self, rid: str, version: str) -> None:
        """`rollout resume --retry-failed` after the fix: the install succeeds (verify then fails: no GPU)."""
        res = self.controller.fleetctl("rollout", "resume", rid, "--retry-failed")
        n = self.node(rid)
        st = self.controller.rollout(rid)
        causes = [t["cause"] for t in st["transitions"]]
        assert "install-wheel succeeded" in causes, (res.out, res.err, causes)
        assert n["state"] == "failed" and str(n["cause"]).startswith("verification failed"), n
        got = self.venv.versions()
        assert got.get("flash-attn") == version and got["torch"] == TORCH_STANDIN_VERSION, got
        self.venv.pip_check()

    def abort(self, rid: str) -> None:
        st = self.controller.rollout(rid)
        if st["status"] in ("running", "paused"):
            self.controller.fleetctl("rollout", "abort", rid)
            deadline = time.monotonic() + 60
            while self.controller.rollout(rid)["status"] in ("running", "paused", "aborting"):
                assert time.monotonic() < deadline, self.controller.rollout(rid)
                time.sleep(0.3)


def _rid(res: Result) -> str:
    for line in res.out.splitlines():
        if line.startswith("rollout ") and " started by " in line:
            return line.split()[1]
    raise AssertionError(f"no rollout started (exit {res.rc}):\n{res.out}{res.err}")


def _sha_release(root: Path, version: str) -> Path:
    """A release wheel of ``version`` that requires ``DEP`` besides torch and einops, as upstream names it."""
    tag = local_python_tag()
    name = f"flash_attn-{version}+cu{FA2_CUDA}torch{FA2_TORCH}cxx11abiTRUE-{tag}-{tag}-{WHEEL_PLATFORM}.whl"
    files = {"flash_attn/__init__.py": f'__version__ = "{version}"\nSTAND_IN = True\n'}
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_bytes(wheel_bytes("flash_attn", version, files, ("torch", "einops", DEP),
                                 tag=f"{tag}-{tag}-{WHEEL_PLATFORM}"))
    return path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_ansible()
    root = tmp_path_factory.mktemp("realnode-faults")
    up = TimedUpstream(root=root / "upstream", hang_s=60)
    with up:
        wheels: dict[str, Path] = {}
        for key, version in VERSIONS.items():
            if key == "sha":
                wheels[version] = _sha_release(root / "universes" / version, version)
                up.add_release_asset(version, wheels[version])
                continue
            u = fa2_universe(root / "universes" / version, version, torch=FA2_TORCH, cuda=FA2_CUDA,
                             python_tags=[local_python_tag()])
            up.publish(u)
            (wheels[version],) = (p for _, p in u.release_assets)
        dep = root / "universes" / DEP_WHEEL
        dep.write_bytes(wheel_bytes(DEP, "1.0.0", {"fleet_standin_dep.py": "STAND_IN = True\n"}))
        c = Controller(root / "controller", up)
        add_user_wheels(c.state, parse_catalog_json({"wheels": [catalog_entry(w, v) for v, w in wheels.items()]},
                                                    "user", "faults"))
        venv = TargetVenv.make(root / "venv", torch_wheel(root / "torch"), with_pip=True)
        agent = AgentProc(c, HOST, "h200", venv, root / "node")
        with running(c, [agent]):
            yield Rig(c, up, venv, agent, wheels, dep)


def test_release_wheel_404_names_the_file_and_the_fix(rig: Rig) -> None:
    version = VERSIONS["404"]
    wheel = rig.wheels[version].name
    before = rig.venv.versions()
    rig.upstream.fail(wheel, "404")
    res = rig.rollout(version)
    rid = _rid(res)
    try:
        assert res.rc == 10 and "paused" in res.out, res.out + res.err    # --max-failures 0: paused
        n = rig.node(rid)
        cause = str(n["cause"])
        assert n["state"] == "failed" and cause.startswith("install-wheel not started: cannot fetch"), n
        # both mirror locations were tried, each answered 404; the fix and the resume are named
        assert f"{rig.upstream.releases_url}/v{version}/{wheel}: HTTP 404" in cause, cause
        assert f"{rig.upstream.releases_url}/{wheel}: HTTP 404" in cause, cause
        assert f"fleetctl artifact add {wheel}" in cause and f"fleetctl rollout resume {rid} --retry-failed" in cause
        assert rig.rollout_jobs(rid) == []             # the node was never asked to install anything
        assert rig.venv.versions() == before
        assert rig.stored(wheel) == []
        rig.upstream.clear_faults()
        rig.converge(rid, version)
    finally:
        rig.upstream.clear_faults()
        rig.abort(rid)


def test_truncated_download_is_refused_and_nothing_is_stored(rig: Rig) -> None:
    version = VERSIONS["truncate"]
    wheel = rig.wheels[version].name
    before = rig.venv.versions()
    rig.upstream.fail(wheel, "truncate")
    res = rig.rollout(version)
    rid = _rid(res)
    try:
        n = rig.node(rid)
        cause = str(n["cause"])
        assert n["state"] == "failed" and wheel in cause, n
        assert "nothing was stored" in cause and "retry" in cause, cause
        assert rig.stored(wheel) == [] and rig.partial_files() == []   # no row, no partial file
        assert rig.rollout_jobs(rid) == [] and rig.venv.versions() == before
        rig.upstream.clear_faults()
        rig.converge(rid, version)
        assert len(rig.stored(wheel)) == 1
    finally:
        rig.upstream.clear_faults()
        rig.abort(rid)


def test_wrong_sha256_from_the_index_is_refused(rig: Rig) -> None:
    version = VERSIONS["sha"]
    assert rig.dep is not None
    before = rig.venv.versions()
    rig.upstream.add_to_index(rig.dep, advertised_sha256="0" * 64)
    res = rig.rollout(version)
    rid = _rid(res)
    try:
        n = rig.node(rid)
        cause = str(n["cause"])
        assert n["state"] == "failed" and "cannot resolve" in cause and DEP in cause, n
        assert f"sha256 mismatch for {DEP_WHEEL}: the index advertises {'0' * 64}, the file has " \
               f"{sha256_file(rig.dep)}; refused, nothing stored" in cause, cause
        assert rig.stored(DEP_WHEEL) == [] and rig.partial_files() == []
        assert rig.rollout_jobs(rid) == [] and rig.venv.versions() == before
        rig.upstream.add_to_index(rig.dep)      # the index fixed
        rig.converge(rid, version)
        assert rig.venv.versions(DEP).get(DEP) == "1.0.0"
    finally:
        rig.abort(rid)


def test_upstream_down_mid_download_then_back(rig: Rig) -> None:
    version = VERSIONS["down"]
    wheel = rig.wheels[version].name
    before = rig.venv.versions()
    up = rig.upstream
    up.fail(wheel, "hang")        # the controller's download hangs …
    started = rig.controller.spawn("rollout", "flash-attn", "--version", version, "--nodes", HOST, "--canary", "0",
                                   "--batch", "100%", "--max-failures", "0", "--verify-mode", "quick")
    rid = ""
    try:
        deadline = time.monotonic() + 60
        while up.fetched(wheel) == 0:
            assert time.monotonic() < deadline and started.poll() is None, "the controller never asked upstream"
            time.sleep(0.1)
        up.down()                 # … and upstream goes away under it
        out = started.communicate(timeout=120)[0]
        rid = _rid(Result(started.returncode, out, ""))
        assert started.returncode == 10, out
        n = rig.node(rid)
        cause = str(n["cause"])
        assert n["state"] == "failed" and f"cannot fetch {wheel} from {up.releases_url}/v{version}/" in cause, n
        assert "is the upstream reachable from the controller?" in cause, cause
        assert rig.stored(wheel) == [] and rig.partial_files() == []
        assert rig.rollout_jobs(rid) == [] and rig.venv.versions() == before
        up.clear_faults()
        up.up()
        rig.converge(rid, version)
    finally:
        up.clear_faults()
        up.up()
        if started.poll() is None:
            started.kill()
        if rid:
            rig.abort(rid)

"""Artifact sizes of the H100 run over the real transports: the 8 MB sdist in through `fleetctl artifact add`
(HTTP, streamed), a 64 MB wheel up from the agent (UploadArtifact, 128 KiB gRPC chunks under the 320 KiB
message limit) and back down (FetchArtifact), sha256 checked at each end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from fleetctl.controller.app import RunningController
from fleetctl.controller.cli import main as fleetctl
from tests.integration.fleet.test_jobs_artifacts_cli import ScriptedRunner
from tests.integration.fleet_support import SimAgents, wait_for

pytestmark = pytest.mark.timeout(240)


async def test_64mb_wheel_up_and_down_and_8mb_sdist_by_cli(controller: RunningController, fleet: SimAgents,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = tmp_path / "flash-attn-2.8.3.post1.tar.gz"
    sdist.write_bytes(os.urandom(8_451_657))
    monkeypatch.setenv("FLEETCTL_STATE_DIR", str(controller.ctx.settings.state_dir))
    rc = await asyncio.to_thread(fleetctl, ["artifact", "add", str(sdist), "--name", "flash_attn-2.8.3.post1.tar.gz",
                                            "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    info = json.loads(out)
    assert info["kind"] == "sdist" and info["size"] == 8_451_657
    assert info["sha256"] == hashlib.sha256(sdist.read_bytes()).hexdigest()
    # an agent uploads only the wheel of its own running build job (controller/build_uploads.py)
    sim = await fleet.start("node-1", "h100-cu130", runner=ScriptedRunner(events=1, delay=30))
    job_id = await controller.ctx.jobs.submit_job("node-1", "build-from-source",
                                                  {"flash_attn_version": "2.8.3.post1", "build_key": "k"}, timeout=60)
    await wait_for(lambda: controller.ctx.jobs.get(job_id, events=False)["status"] in ("dispatched", "running"))
    wheel = tmp_path / "flash_attn-2.8.3.post1-cp312-cp312-linux_x86_64.whl"
    with wheel.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert await sim.agent.upload_artifact(wheel, kind="wheel", job_id=job_id) == digest
    got = await sim.agent.fetch_artifact(digest, tmp_path / "dl")
    assert got.name == wheel.name and hashlib.sha256(got.read_bytes()).hexdigest() == digest

    rc = await asyncio.to_thread(fleetctl, ["artifact", "list", "--json"])
    listed = json.loads(capsys.readouterr().out)["artifacts"]
    assert rc == 0 and {a["filename"] for a in listed} == {wheel.name, "flash_attn-2.8.3.post1.tar.gz"}
    # a wrong announced digest is refused and nothing is stored
    bad = tmp_path / "x.whl"
    bad.write_bytes(b"abc")
    from fleetctl.controller.client import ControllerClient
    from fleetctl.controller.commands.artifacts import upload

    client = ControllerClient.discover()  # sync HTTP: off the event loop that serves it
    resp = await asyncio.to_thread(client._http.post, "/api/v1/artifacts", content=b"abc",
                                   params={"filename": "x.whl", "kind": "wheel", "sha256": "0" * 64})
    assert resp.status_code == 422 and "not the announced" in resp.json()["error"]["message"]
    assert len((await asyncio.to_thread(client.get, "/artifacts"))["artifacts"]) == 2
    assert (await asyncio.to_thread(upload, client, bad, "wheel"))["size"] == 3

"""Per-user API tokens (issue 13, hygiene): the audit actor is who authenticated, never the name a client
claims; roles apply to tokens as on the dashboard; revoked and expired tokens are refused; the admin token
still works (actor ``admin``); the store holds only a hash. A real controller and sim agents, fleetctl as a
separate process (as tests/integration/rollout/test_rollout_cli.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from fleetctl.controller.api_tokens import create_token, revoke_token
from fleetctl.controller.app import RunningController
from fleetctl.controller.store import utcnow
from fleetctl.controller.users import ApiToken
from fleetctl.controller.web.auth import add_user
from tests.integration.fleet_support import SimAgents
from tests.integration.rollout.simrunner import Script, SimRunner

pytestmark = pytest.mark.timeout(240)

PASSWORD = "correct horse battery"


async def fleetctl(rc: RunningController, token: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "USER": "tester", "PYTHONUNBUFFERED": "1", "FLEETCTL_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetctl.controller.cli", *args, "--state-dir", str(rc.ctx.settings.state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def audit_rows(rc: RunningController, rid: str) -> list[dict[str, Any]]:
    from fleetctl.controller.rollout import service
    return service.audit_entries(rc.ctx.store, rid)


async def test_token_principal_is_the_audit_actor(controller: RunningController, fleet: SimAgents,
                                                  tmp_path: Path) -> None:
    rc = controller
    store = rc.ctx.store
    add_user(store, "olga", "operator", PASSWORD)
    add_user(store, "victor", "viewer", PASSWORD)
    olga, listing = create_token(store, "olga", dt.timedelta(hours=1))
    victor, _ = create_token(store, "victor", dt.timedelta(hours=1))
    assert listing["role"] == "operator" and listing["state"] == "active"

    script = Script()
    for host, profile in (("a100-1", "a100"), ("h100-1", "h100")):
        runner = SimRunner.for_profile(host, profile, script, tmp_path / "work" / host)
        sim = await fleet.start(host, profile, runner=runner, facts=runner.current_facts)
        runner.agent = sim.agent

    # an operator's token starts a rollout claiming to be mallory: the actor is olga, mallory only a detail
    rc_, out, err = await fleetctl(rc, olga, "rollout", "flash-attn", "--nodes", "gpu=A100", "--actor", "mallory",
                                   "--detach")
    assert rc_ == 0, out + err
    rid = out.split()[1]
    [start] = [a for a in audit_rows(rc, rid) if a["action"] == "rollout.start"]
    assert start["actor"] == "olga", start
    assert start["detail"]["on_behalf_of"] == "mallory"

    base = rc.ctx.http_url
    assert base is not None
    async with httpx.AsyncClient(base_url=f"{base}/api/v1") as api:
        def bearer(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        # a viewer's token reads, and is refused for writes with a clear 403
        r = await api.get("/rollouts", headers=bearer(victor))
        assert r.status_code == 200 and rid in r.text
        r = await api.post("/rollouts", headers=bearer(victor), json={"nodes": "gpu=H100", "actor": "victor"})
        assert r.status_code == 403, r.text
        err_body = r.json()["error"]
        assert err_body["code"] == "forbidden" and "viewer role" in err_body["message"], err_body
        assert "operator role" in err_body["message"] and err_body["hint"]
        r = await api.post("/tokens", headers=bearer(olga), json={"ttl_seconds": 60})  # admin only
        assert r.status_code == 403 and "admin role" in r.json()["error"]["message"]
        rc_, out, err = await fleetctl(rc, victor, "rollout", "flash-attn", "--nodes", "gpu=H100", "--detach")
        assert rc_ == 6 and "error[forbidden]" in err and "viewer role" in err, out + err

        # the admin token (break-glass) still works, and is audited as admin whatever the client claims
        r = await api.post("/rollouts", headers=bearer(rc.ctx.admin_token),
                           json={"nodes": "gpu=H100", "canary": 0, "batch": "100%", "actor": "tester"})
        assert r.status_code == 200, r.text
        rid2 = r.json()["id"]
        [start2] = [a for a in audit_rows(rc, rid2) if a["action"] == "rollout.start"]
        assert start2["actor"] == "admin" and start2["detail"]["on_behalf_of"] == "tester", start2
        r = await api.get("/audit", headers=bearer(olga))  # the claimed names never became actors
        actors = {a["actor"] for a in r.json()["audit"]}
        assert "mallory" not in actors and "tester" not in actors and "olga" in actors

        # revoked and expired tokens are refused (401)
        revoke_token(store, olga)
        r = await api.get("/rollouts", headers=bearer(olga))
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"], r.text
        with store.session() as s:
            s.execute(update(ApiToken).values(expires_at=utcnow() - dt.timedelta(seconds=1))
                      .where(ApiToken.token_hash == hashlib.sha256(victor.encode()).hexdigest()))
        r = await api.get("/rollouts", headers=bearer(victor))
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"], r.text
        r = await api.get("/rollouts", headers=bearer("fleetu_" + "x" * 43))
        assert r.status_code == 401

    # tokens are never stored in clear: no column of any row holds the token or a piece of its secret part
    with store.session() as s:
        rows = list(s.scalars(select(ApiToken)))
        assert len(rows) == 2
        for row in rows:
            values = [str(getattr(row, c.key)) for c in ApiToken.__table__.columns]
            for token in (olga, victor):
                assert not any(token in v or token[len(row.prefix):][:16] in v for v in values), values
        assert {row.token_hash for row in rows} == {hashlib.sha256(t.encode()).hexdigest() for t in (olga, victor)}
        assert all(row.last_used_at is not None for row in rows)


def test_fleetctl_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--token-file wins over $FLEETCTL_TOKEN, which wins over STATE/admin.token (the break-glass credential)."""
    from fleetctl.controller.client import ControllerClient
    from fleetctl.fleet.errors import AuthError

    (tmp_path / "admin.token").write_text("admintoken\n")
    (tmp_path / "controller.json").write_text('{"http": "http://127.0.0.1:9"}')
    (tmp_path / "mine").write_text("fleetu_mine\n")
    monkeypatch.delenv("FLEETCTL_TOKEN", raising=False)
    monkeypatch.delenv("FLEETCTL_TOKEN_FILE", raising=False)
    assert ControllerClient.discover(state_dir=tmp_path).token == "admintoken"
    monkeypatch.setenv("FLEETCTL_TOKEN", "fleetu_env")
    assert ControllerClient.discover(state_dir=tmp_path).token == "fleetu_env"
    assert ControllerClient.discover(state_dir=tmp_path, token_file=tmp_path / "mine").token == "fleetu_mine"
    with pytest.raises(AuthError, match="cannot read the token file"):
        ControllerClient.discover(state_dir=tmp_path, token_file=tmp_path / "absent")

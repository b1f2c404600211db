"""Issue 13: optional signature checks for operator-added artifacts. Real controller (HTTP API), real
``fleetctl artifact add --sig``, real gpg keys generated here and a real ``gpg --verify``.

A controller started with a trusted keyring stores a file signed by a key in it and records the signer's
fingerprint in its ``user`` provenance; a signature by any other key, or one that does not match the file, is
refused (nothing stored, audited); with ``--require-signed`` an unsigned upload is refused; without it an
unsigned upload is stored as before.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import select

from fleetctl.controller.app import RunningController, start_controller
from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.commands import serve
from fleetctl.controller.main import main as controller_main
from fleetctl.controller.settings import settings_from
from fleetctl.controller.signatures import SignaturePolicy
from fleetctl.controller.store.models import AuditLog
from fleetctl.fleet.cli import build_parser
from fleetctl.fleet.errors import UsageError
from tests.integration.fleet_support import controller_settings
from tests.integration.harness.aptrepo import GpgKey

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(
    subprocess.run(["which", "gpg"], capture_output=True, check=False).returncode != 0,
    reason="gpg is not installed (scripts/bootstrap installs gnupg)")]

NAME = "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp311-cp311-linux_x86_64.whl"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GpgKey, GpgKey]]:
    work = tmp_path_factory.mktemp("gpg")
    operator, stranger = GpgKey(work, "Fleet Operator"), GpgKey(work, "Someone Else")
    try:
        yield operator, stranger
    finally:
        operator.close()
        stranger.close()


def sign(key: GpgKey, path: Path, *, armor: bool = False) -> Path:
    sig = path.with_name(path.name + (".asc" if armor else ".sig"))
    subprocess.run(["gpg", "--batch", "--yes", "--local-user", key.fingerprint, *(["--armor"] if armor else []),
                    "--output", str(sig), "--detach-sign", str(path)], env=key.env, check=True, capture_output=True)
    return sig


@pytest_asyncio.fixture
async def signed_controller(request: pytest.FixtureRequest, keys: tuple[GpgKey, GpgKey],
                            tmp_path: Path) -> AsyncIterator[RunningController]:
    require = bool(getattr(request, "param", False))
    keyring = keys[0].export_armored(tmp_path / "operators.asc")
    rc = await start_controller(controller_settings(tmp_path / "controller", trusted_keyring=keyring,
                                                    require_signed=require))
    try:
        yield rc
    finally:
        await rc.stop(grace=0.2)


async def add(rc: RunningController, *argv: str) -> int:
    return await asyncio.to_thread(fleetctl, ["artifact", "add", *argv, "--json", "--state-dir",
                                              str(rc.ctx.settings.state_dir)])


def nothing_stored(rc: RunningController) -> None:
    assert rc.ctx.artifacts.list_all() == []
    assert [p.name for p in (rc.ctx.artifacts.root / "tmp").glob("*")] == []


def refusals(rc: RunningController) -> list[AuditLog]:
    with rc.ctx.store.session() as s:
        rows = list(s.scalars(select(AuditLog).where(AuditLog.action == "artifact.add.refused")))
        s.expunge_all()
        return rows


async def test_signed_by_a_trusted_key_is_stored_with_the_signer(
        signed_controller: RunningController, keys: tuple[GpgKey, GpgKey], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    operator = keys[0]
    src = tmp_path / NAME
    src.write_bytes(b"PK\x03\x04 the operator's wheel")
    for armor in (False, True):
        assert await add(signed_controller, str(src), "--sig", str(sign(operator, src, armor=armor))) == 0
        added = json.loads(capsys.readouterr().out)
        (prov,) = [p for p in added["provenance"] if p["source"] == "user"]
        assert prov["signer"] == operator.fingerprint and prov["signature"] == "openpgp"
        assert "Fleet Operator" in prov["signer_uid"]
    (info,) = signed_controller.ctx.artifacts.list_all()
    assert info.filename == NAME and [p.detail.get("signer") for p in info.sources] == [operator.fingerprint]
    # the same file added unsigned first, then signed: the signed record is added beside the unsigned one
    other = tmp_path / "flash_attn-2.8.3.tar.gz"
    other.write_bytes(b"an sdist")
    assert await add(signed_controller, str(other)) == 0
    assert await add(signed_controller, str(other), "--sig", str(sign(operator, other))) == 0
    added = json.loads(capsys.readouterr().out.split("\n}\n", 1)[1])
    assert sorted(str(p.get("signer")) for p in added["provenance"]) == [operator.fingerprint, "None"]


async def test_signed_by_another_key_or_not_matching_is_refused(
        signed_controller: RunningController, keys: tuple[GpgKey, GpgKey], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    operator, stranger = keys
    src = tmp_path / NAME
    src.write_bytes(b"PK\x03\x04 a wheel someone else signed")
    assert await add(signed_controller, str(src), "--sig", str(sign(stranger, src))) == 3
    err = capsys.readouterr().err
    assert "error[bad-signature]" in err and stranger.fingerprint in err
    assert "not in the controller's trusted keyring" in err and "nothing stored" in err
    nothing_stored(signed_controller)
    # a trusted key's signature of other bytes: BAD signature
    sig = sign(operator, src)
    src.write_bytes(b"PK\x03\x04 modified after signing")
    assert await add(signed_controller, str(src), "--sig", str(sig)) == 3
    assert "does not match the file" in capsys.readouterr().err
    # not a signature at all
    junk = tmp_path / "junk.sig"
    junk.write_bytes(b"not an OpenPGP signature")
    assert await add(signed_controller, str(src), "--sig", str(junk)) == 3
    assert "not a valid detached OpenPGP signature" in capsys.readouterr().err
    nothing_stored(signed_controller)
    rows = refusals(signed_controller)
    assert len(rows) == 3 and all(r.detail["filename"] == NAME for r in rows)


@pytest.mark.parametrize("signed_controller", [True], indirect=True)
async def test_unsigned_is_refused_with_require_signed(signed_controller: RunningController, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / NAME
    src.write_bytes(b"PK\x03\x04 unsigned")
    assert await add(signed_controller, str(src)) == 3
    err = capsys.readouterr().err
    assert "unsigned upload refused" in err and "--require-signed" in err and "--sig FILE.sig" in err
    nothing_stored(signed_controller)


async def test_unsigned_without_require_signed_is_stored_as_before(
        signed_controller: RunningController, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / NAME
    src.write_bytes(b"PK\x03\x04 unsigned")
    assert await add(signed_controller, str(src)) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["source"] == "user" and "signer" not in added["provenance"][0]


async def test_signature_to_a_controller_without_keyring_is_refused(
        keys: tuple[GpgKey, GpgKey], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = await start_controller(controller_settings(tmp_path / "controller"))
    try:
        src = tmp_path / NAME
        src.write_bytes(b"PK\x03\x04 signed, but nobody checks")
        assert await add(rc, str(src), "--sig", str(sign(keys[0], src))) == 3
        assert "started without --trusted-keyring" in capsys.readouterr().err
        nothing_stored(rc)
    finally:
        await rc.stop(grace=0.2)


def test_serve_flags(keys: tuple[GpgKey, GpgKey], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fleet-controller serve --trusted-keyring FILE [--require-signed]``; --require-signed alone is a usage
    error; a keyring with no key is refused at start."""
    assert controller_main(["serve", "--require-signed", "--state-dir", str(tmp_path / "s")]) == 2
    assert "--require-signed needs --trusted-keyring" in capsys.readouterr().err
    keyring = keys[0].export_binary(tmp_path / "operators.gpg")
    parser = build_parser("fleet-controller", "", [serve])
    settings = settings_from(parser.parse_args(["serve", "--trusted-keyring", str(keyring), "--require-signed"]),
                             {})
    assert settings.trusted_keyring == keyring and settings.require_signed
    policy = SignaturePolicy.create(keyring, True, tmp_path / "gnupg")
    assert policy.fingerprints == (keys[0].fingerprint,) and (tmp_path / "gnupg").stat().st_mode & 0o777 == 0o700
    empty = tmp_path / "empty.asc"
    empty.write_text("")
    with pytest.raises(UsageError, match="holds no OpenPGP public key"):
        SignaturePolicy.create(empty, False, tmp_path / "gnupg")

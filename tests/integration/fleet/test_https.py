"""HTTPS for the HTTP API and dashboard: a real controller (uvicorn over TLS) and real clients (httpx, fleetctl)
verifying it against the controller's CA, a user-supplied certificate, a wrong CA, plain HTTP only when asked."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetctl.controller.app import start_controller
from fleetctl.controller.ca import CertAuthority
from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.settings import add_arguments, settings_from
from fleetctl.fleet.errors import InputError, UsageError
from tests.integration.fleet_support import controller_settings

pytestmark = pytest.mark.timeout(120)


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path, Path]:
    """(cert, key, CA) of a user-supplied certificate for ``name`` issued by a CA of the test's own."""
    ca = CertAuthority(tmp / f"user-ca-{name}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, ca.ca_path


async def test_default_is_https_with_the_controllers_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = await start_controller(controller_settings(tmp_path / "c", http_insecure=False))
    try:
        url = rc.ctx.http_url
        assert url and url.startswith("https://127.0.0.1:")
        ca = rc.ctx.settings.state_dir / "ca" / "ca.pem"
        async with httpx.AsyncClient(base_url=url, verify=ssl.create_default_context(cafile=ca)) as http:
            live = await http.get("/api/v1/live")
            assert live.status_code == 200 and live.json()["ok"] is True
            login = await http.get("/login")
            assert "secure" in login.headers["set-cookie"].lower()  # cookies are Secure under HTTPS
        async with httpx.AsyncClient(base_url=url) as http:  # the system's trust store does not know our CA
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get("/api/v1/live")
        async with httpx.AsyncClient(base_url=url.replace("https://", "http://")) as http:  # no plain HTTP
            with pytest.raises(httpx.HTTPError):
                await http.get("/api/v1/live")
        # fleetctl finds URL and CA in STATE/controller.json
        code = await asyncio.to_thread(fleetctl, ["nodes", "--state-dir", str(rc.ctx.settings.state_dir)])
        _, err = capsys.readouterr()
        assert code == 0, err
        # the URL given, the state dir here too: that controller's CA
        code = await asyncio.to_thread(fleetctl, ["nodes", "--state-dir", str(rc.ctx.settings.state_dir),
                                                  "--controller", url])
        _, err = capsys.readouterr()
        assert code == 0, err
        # a wrong CA: a clear error naming the CA and what to do
        wrong = CertAuthority(tmp_path / "other-ca").ca_path
        code = await asyncio.to_thread(fleetctl, ["nodes", "--state-dir", str(rc.ctx.settings.state_dir),
                                                  "--ca", str(wrong)])
        _, err = capsys.readouterr()
        assert code == 6
        assert "error[tls-verify]" in err and str(wrong) in err and "hint:" in err and "--ca" in err
        # http:// to an HTTPS controller: said so
        code = await asyncio.to_thread(fleetctl, ["nodes", "--state-dir", str(rc.ctx.settings.state_dir),
                                                  "--controller", url.replace("https://", "http://")])
        _, err = capsys.readouterr()
        assert code == 7 and "https://" in err
    finally:
        await rc.stop(grace=0.2)


async def test_user_supplied_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key, user_ca = _self_signed(tmp_path, "controller.example")
    rc = await start_controller(controller_settings(tmp_path / "c", http_insecure=False, http_cert=cert, http_key=key))
    try:
        url = rc.ctx.http_url
        assert url and url.startswith("https://")
        async with httpx.AsyncClient(base_url=url, verify=ssl.create_default_context(cafile=user_ca)) as http:
            assert (await http.get("/api/v1/live")).status_code == 200
        state = str(rc.ctx.settings.state_dir)
        code = await asyncio.to_thread(fleetctl, ["nodes", "--state-dir", state, "--ca", str(user_ca)])
        _, err = capsys.readouterr()
        assert code == 0, err
        code = await asyncio.to_thread(fleetctl, ["nodes", "--state-dir", state,  # the agents' CA is not its issuer
                                                  "--ca", str(rc.ctx.settings.state_dir / "ca" / "ca.pem")])
        _, err = capsys.readouterr()
        assert code == 6 and "error[tls-verify]" in err
    finally:
        await rc.stop(grace=0.2)


async def test_plain_http_only_when_asked_and_said_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rc = await start_controller(controller_settings(tmp_path / "c", http_insecure=True))
    try:
        assert rc.ctx.http_url and rc.ctx.http_url.startswith("http://")
        async with httpx.AsyncClient(base_url=rc.ctx.http_url) as http:
            assert (await http.get("/api/v1/live")).status_code == 200
    finally:
        await rc.stop(grace=0.2)
    assert any("PLAIN HTTP" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


async def test_unusable_certificate_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    cert, _, _ = _self_signed(tmp_path, "one")
    _, other_key, _ = _self_signed(tmp_path, "two")
    for cert_path, key_path, says in ((tmp_path / "missing.pem", other_key, "missing.pem"),
                                      (cert, other_key, "one.pem")):  # a key that is not the certificate's
        with pytest.raises(InputError, match=says) as err:
            await start_controller(controller_settings(tmp_path / "c", http_insecure=False, http_cert=cert_path,
                                                       http_key=key_path))
        assert err.value.hint and "--http-cert" in err.value.hint


@pytest.mark.parametrize(("argv", "says"), [
    (["--http-cert", "c.pem"], "--http-cert and --http-key go together"),
    (["--http-key", "k.pem"], "--http-cert and --http-key go together"),
    (["--http-insecure", "--http-cert", "c.pem", "--http-key", "k.pem"], "would not be used"),
])
def test_https_options_that_do_not_fit_together_are_refused(argv: list[str], says: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(UsageError, match=says):
        settings_from(parser.parse_args(argv), {})


async def test_a_wildcard_listen_address_is_dialled_on_loopback_with_a_certificate_naming_it(tmp_path: Path) -> None:
    rc = await start_controller(controller_settings(tmp_path / "c", http_insecure=False, http_listen="0.0.0.0:0"))
    try:
        url = rc.ctx.http_url
        assert url and url.startswith("https://127.0.0.1:")
        ca = rc.ctx.settings.state_dir / "ca" / "ca.pem"
        async with httpx.AsyncClient(base_url=url, verify=ssl.create_default_context(cafile=ca)) as http:
            assert (await http.get("/api/v1/live")).status_code == 200
    finally:
        await rc.stop(grace=0.2)

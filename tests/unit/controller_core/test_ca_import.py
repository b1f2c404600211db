"""Bring-your-own CA without a controller: an RSA root imported, then used to issue server and agent certificates
that verify against it; a failed import leaves the CA directory as it was."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fleetctl.controller.ca import CertAuthority, import_ca, make_csr, new_key
from fleetctl.fleet.errors import InputError


def rsa_root(cn: str = "Site Root") -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_an_rsa_root_signs_server_and_agent_certificates(tmp_path: Path) -> None:
    cert_pem, key_pem = rsa_root()
    imported = import_ca(tmp_path / "ca", cert_pem, key_pem)
    assert not imported.intermediate and imported.previous is None and imported.chain == 0
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    ca = CertAuthority(tmp_path / "ca")
    root = x509.load_pem_x509_certificate(cert_pem)
    issued = ca.sign_csr(make_csr(new_key(), "n1"), "agent-1", dt.timedelta(days=90))
    leaf = x509.load_pem_x509_certificate(issued.pem)
    leaf.verify_directly_issued_by(root)
    assert issued.pem.count(b"BEGIN CERTIFICATE") == 1  # a root is the verifier's own: nothing sent after it
    assert issued.not_after <= root.not_valid_after_utc  # never beyond the CA's end (30 days here, not 90)
    _, server_pem = ca.server_credentials(["10.0.0.1"])
    x509.load_pem_x509_certificate(server_pem).verify_directly_issued_by(root)


def test_a_failed_import_changes_nothing(tmp_path: Path) -> None:
    CertAuthority(tmp_path / "ca")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()}
    cert_pem, _ = rsa_root()
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(InputError) as err:
        import_ca(tmp_path / "ca", cert_pem, other_key)
    assert "is not the private key of --cert" in err.value.message and "nothing was changed" in (err.value.hint or "")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()} == before

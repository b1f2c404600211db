"""The controller's certificate authority (STATE/ca): CA key/cert, server certificate, CSR signing.

Created on first start. Keys are EC P-256, written 0600. The server certificate carries
every host name and IP address the controller is reached at (always ``localhost`` and
``127.0.0.1``, plus the listen address and any extra names given, e.g. the addresses
simulated nodes use); it is re-issued when a new name is asked for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetctl.fleet.errors import AuthError, InputError

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 365
MAX_CSR_BYTES = 16 * 1024


def client_cert_not_after(issued_at: dt.datetime) -> dt.datetime:
    """When an agent's certificate expires: it is signed once, at enrollment (``sign_csr``, ``CLIENT_DAYS``), so
    its identity's ``created_at`` plus that (/metrics' ``fleet_node_agent_cert_expiry_timestamp_seconds``; an
    agent is re-enrolled to renew it)."""
    return issued_at + dt.timedelta(days=CLIENT_DAYS)


@dataclass(frozen=True)
class IssuedCert:
    pem: bytes
    serial: str  # hex
    fingerprint: str  # sha256 hex of DER


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def cert_identity(pem: bytes | str) -> tuple[str, str, str]:
    """(common name, serial hex, fingerprint) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    return cn, format(cert.serial_number, "x"), fingerprint(cert)


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A CSR for the agent's key (the controller replaces the subject with the agent id)."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _san(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


class CertAuthority:
    """The CA in ``ca_dir``: ``ca.key``, ``ca.pem``, ``server.key``, ``server.pem``."""

    def __init__(self, ca_dir: Path) -> None:
        self.dir = ca_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        key_path, cert_path = self.dir / "ca.key", self.dir / "ca.pem"
        if key_path.exists() and cert_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            self.key = loaded
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            self.key = new_key()
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetctl"),
                              x509.NameAttribute(NameOID.COMMON_NAME, "fleetctl controller CA")])
            now = dt.datetime.now(dt.UTC)
            self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                         .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                         .not_valid_before(now - dt.timedelta(minutes=5))
                         .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                         .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
                         .sign(self.key, hashes.SHA256()))
            _write_private(key_path, key_pem(self.key))
            cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.ca_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.ca_path = cert_path

    def _builder(self, subject: str, public_key: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(self.cert.subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))

    def server_credentials(self, hosts: list[str]) -> tuple[bytes, bytes]:
        """(key PEM, cert PEM) of the server certificate covering ``localhost``, ``127.0.0.1`` and ``hosts``."""
        wanted = sorted({"localhost", "127.0.0.1", *[h for h in hosts if h and h not in ("0.0.0.0", "::")]})
        key_path, cert_path = self.dir / "server.key", self.dir / "server.pem"
        if key_path.exists() and cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            try:
                have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                covered = {str(v) for v in have.get_values_for_type(x509.DNSName)} | {
                    str(v) for v in have.get_values_for_type(x509.IPAddress)}
            except x509.ExtensionNotFound:
                covered = set()
            fresh = cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
            if set(wanted) <= covered and fresh and cert.issuer == self.cert.subject:
                return key_path.read_bytes(), cert_path.read_bytes()
        key = new_key()
        cert = (self._builder("fleetctl controller", key.public_key(), SERVER_DAYS)
                .add_extension(x509.SubjectAlternativeName(_san(wanted)), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        _write_private(key_path, key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key_pem(key), cert.public_bytes(serialization.Encoding.PEM)

    def sign_csr(self, csr_pem: bytes, agent_id: str, days: int = CLIENT_DAYS) -> IssuedCert:
        """Issue a client certificate with CN = ``agent_id`` for the key in ``csr_pem``."""
        if not csr_pem or len(csr_pem) > MAX_CSR_BYTES:
            raise InputError("missing or oversized certificate signing request",
                             hint="the agent sends a PEM CSR for its own key")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise InputError(f"certificate signing request is not valid PEM: {exc}",
                             hint="the agent sends a PEM CSR for its own key") from exc
        try:
            if not csr.is_signature_valid:
                raise AuthError("certificate signing request signature is invalid", hint="generate a new CSR")
        except InvalidSignature as exc:
            raise AuthError("certificate signing request signature is invalid", hint="generate a new CSR") from exc
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InputError("only EC keys are accepted", hint="use an EC P-256 key (the agent does)")
        cert = (self._builder(agent_id, public_key, days)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), format(cert.serial_number, "x"),
                          fingerprint(cert))

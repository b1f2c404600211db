"""The controller's certificate authority (STATE/ca): CA key/cert, server certificate, CSR signing.

Created on first start (EC P-256 keys, written 0600), or brought by the operator: ``fleet-controller ca
import --cert FILE --key FILE [--chain FILE]`` (``import_ca``) installs a root or an intermediate CA (EC or
RSA key) after checking it — a CA certificate, not expired, the key its own, the chain issuing it up to a
self-signed root — and changes nothing when a check fails. ``ca.pem`` then holds the signing CA followed by
its chain: it is the bundle agents trust (``--ca``), and every certificate the controller issues (its server
certificate, agents' client certificates) is sent with the intermediates, so an agent that trusts only the
root verifies the controller. The server certificate carries every host name and IP address the controller
is reached at (always ``localhost`` and ``127.0.0.1``, plus the listen address and any extra names given,
e.g. the addresses simulated nodes use); it is re-issued when a new name is asked for or the CA changed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetctl.fleet.errors import AuthError, InputError

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_LIFETIME = dt.timedelta(days=365)  # the default; `serve --agent-cert-lifetime` sets another
MAX_CSR_BYTES = 16 * 1024
MAX_BACKDATE = dt.timedelta(minutes=5)  # tolerated clock skew; a tenth of a short lifetime at most

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def client_cert_not_after(issued_at: dt.datetime) -> dt.datetime:
    """When an agent certificate issued before renewal existed expires (its identity has no ``cert_not_after``):
    signed once, at enrollment, for a year."""
    return issued_at + CLIENT_LIFETIME


@dataclass(frozen=True)
class IssuedCert:
    pem: bytes  # the certificate, followed by the intermediates between it and the root
    serial: str  # hex
    fingerprint: str  # sha256 hex of DER
    not_after: dt.datetime


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: CaKey) -> bytes:
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


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def new_ca() -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a new self-signed EC P-256 CA, valid ``CA_DAYS``."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetctl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fleetctl controller CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


class CertAuthority:
    """The CA in ``ca_dir``: ``ca.key``, ``ca.pem`` (the signing CA, then its chain), ``server.key``,
    ``server.pem``. With ``material`` (key PEM, CA bundle PEM: the CA kept in a PostgreSQL database, see
    controller/shared_ca.py) the key is never written here; ``ca.pem`` is (what agents trust)."""

    def __init__(self, ca_dir: Path, material: tuple[bytes, bytes] | None = None) -> None:
        self.dir = ca_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        key_path, cert_path = self.dir / "ca.key", self.dir / "ca.pem"
        if material is None:
            if key_path.exists() and cert_path.exists():
                material = key_path.read_bytes(), cert_path.read_bytes()
            else:
                material = new_ca()
                _write_private(key_path, material[0])
                cert_path.write_bytes(material[1])
        elif not cert_path.exists() or cert_path.read_bytes() != material[1]:
            cert_path.write_bytes(material[1])
        loaded = serialization.load_pem_private_key(material[0], None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
        self.key: CaKey = loaded
        # above the signing CA, up to the root (an imported intermediate)
        self.cert, *self.chain = x509.load_pem_x509_certificates(material[1])
        # what agents trust: the signing CA and its chain (the whole file)
        self.ca_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.cert, *self.chain])
        # sent after every certificate issued here: the intermediates (a root is the verifier's own)
        self.intermediates_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.cert, *self.chain]
                                          if not _is_self_signed(c))
        self.ca_path = cert_path

    def _builder(self, subject: str, public_key: ec.EllipticCurvePublicKey,
                 lifetime: dt.timedelta) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        # never beyond the CA's own end: a certificate outliving its issuer would fail verification early
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(self.cert.subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - min(MAX_BACKDATE, lifetime / 10)).not_valid_after(not_after)
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
            if set(wanted) <= covered and fresh and self._issued_here(cert):
                return key_path.read_bytes(), cert_path.read_bytes()
        key = new_key()
        cert = (self._builder("fleetctl controller", key.public_key(), dt.timedelta(days=SERVER_DAYS))
                .add_extension(x509.SubjectAlternativeName(_san(wanted)), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.intermediates_pem
        _write_private(key_path, key_pem(key))
        cert_path.write_bytes(chain)
        return key_pem(key), chain

    def _issued_here(self, cert: x509.Certificate) -> bool:
        """Signed by this CA's key (not merely naming it: an imported CA may carry the same name)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def check_csr(self, csr_pem: bytes) -> ec.EllipticCurvePublicKey:
        """The EC public key of a well-formed, self-signed CSR; ``InputError``/``AuthError`` saying what is wrong."""
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
        return public_key

    def sign_csr(self, csr_pem: bytes, agent_id: str, lifetime: dt.timedelta = CLIENT_LIFETIME) -> IssuedCert:
        """Issue a client certificate with CN = ``agent_id`` for the key in ``csr_pem``."""
        public_key = self.check_csr(csr_pem)
        cert = (self._builder(agent_id, public_key, lifetime)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM) + self.intermediates_pem,
                          format(cert.serial_number, "x"), fingerprint(cert), cert.not_valid_after_utc)


# ---- bring your own CA -------------------------------------------------------------------------------------

IMPORT_HINT = "nothing was changed; fix the files and run `fleet-controller ca import` again"


@dataclass(frozen=True)
class ImportedCa:
    subject: str
    intermediate: bool
    not_after: dt.datetime
    chain: int  # certificates above it
    previous: Path | None  # where the replaced CA was kept


def _certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise InputError(f"{what} is not a PEM certificate: {exc}", hint=IMPORT_HINT) from None
    return certs


def _check_ca_cert(cert: x509.Certificate, what: str, now: dt.datetime) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InputError(f"{what} ({cert.subject.rfc4514_string()}) is not a CA certificate (basicConstraints CA:TRUE)",
                         hint="give the CA's certificate, not a server or client certificate; " + IMPORT_HINT)
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise InputError(f"{what} may not sign certificates (its keyUsage lacks keyCertSign)", hint=IMPORT_HINT)
    except x509.ExtensionNotFound:
        pass
    if cert.not_valid_after_utc <= now or cert.not_valid_before_utc > now:
        raise InputError(f"{what} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                         f"{cert.not_valid_after_utc:%Y-%m-%d})", hint=IMPORT_HINT)


def import_ca(ca_dir: Path, cert_pem: bytes, key_pem_data: bytes, chain_pem: bytes | None = None) -> ImportedCa:
    """Install an operator's CA (a root, or an intermediate with ``chain_pem`` up to its root) as this controller's,
    after checking everything; on any ``InputError`` nothing in ``ca_dir`` has changed. The replaced CA is kept in
    ``ca_dir/previous-<time>/``; the server certificate is re-issued at the next start."""
    now = dt.datetime.now(dt.UTC)
    certs = _certs(cert_pem, "--cert")
    if len(certs) != 1:
        raise InputError(f"--cert holds {len(certs)} certificates, expected the CA's own one",
                         hint="put the issuers of an intermediate in --chain; " + IMPORT_HINT)
    cert = certs[0]
    _check_ca_cert(cert, "--cert", now)
    try:
        key = serialization.load_pem_private_key(key_pem_data, None)
    except TypeError:
        raise InputError("--key is encrypted with a passphrase",
                         hint="decrypt it for the controller (openssl pkey -in KEY -out PLAIN.key; keep it 0600); "
                              + IMPORT_HINT) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(f"--key is not a PEM private key: {exc}", hint=IMPORT_HINT) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InputError(f"--key is a {type(key).__name__}; the controller signs with EC or RSA keys",
                         hint=IMPORT_HINT)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise InputError("--key is not the private key of --cert (their public keys differ)",
                         hint="give the key the CA certificate was made for; " + IMPORT_HINT)
    chain = _certs(chain_pem, "--chain") if chain_pem else []
    for i, issuer in enumerate(chain):
        _check_ca_cert(issuer, f"certificate {i + 1} of --chain", now)
    for child, issuer in zip([cert, *chain], chain, strict=False):
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise InputError(f"--chain does not go up from {child.subject.rfc4514_string()}: "
                             f"{issuer.subject.rfc4514_string()} did not issue it",
                             hint="order --chain from the CA's issuer up to the root; " + IMPORT_HINT) from None
    top = chain[-1] if chain else cert
    if not _is_self_signed(top):
        raise InputError(f"{'--chain' if chain else '--cert'} ends at {top.subject.rfc4514_string()}, which is not a "
                         "self-signed root", hint="an intermediate CA needs --chain with its issuers up to the root "
                                                  "(agents verify the controller up to a root); " + IMPORT_HINT)
    ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    previous = None
    if (ca_dir / "ca.key").exists():
        previous = ca_dir / f"previous-{now:%Y%m%dT%H%M%SZ}"
        previous.mkdir(mode=0o700)
        for name in ("ca.key", "ca.pem", "server.key", "server.pem"):
            if (ca_dir / name).exists():
                os.replace(ca_dir / name, previous / name)
    bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *chain])
    _write_private(ca_dir / "ca.key.new", key_pem(key))
    (ca_dir / "ca.pem.new").write_bytes(bundle)
    os.replace(ca_dir / "ca.key.new", ca_dir / "ca.key")
    os.replace(ca_dir / "ca.pem.new", ca_dir / "ca.pem")
    return ImportedCa(cert.subject.rfc4514_string(), not _is_self_signed(cert), cert.not_valid_after_utc, len(chain),
                      previous)

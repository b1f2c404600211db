"""The CA and the admin tokens of several controllers on one PostgreSQL database (docs/ha.md, "What is shared").

On PostgreSQL the controllers' CA is one row of the ``ca`` table, so a controller started with an empty state dir
signs with the same CA as the others and agents verify every controller with one CA file:

- the first controller to start inserts it (``INSERT … ON CONFLICT DO NOTHING`` on the one-row key: of two
  controllers starting together one insert wins, the other reads the winner's): a new CA, or the CA already in
  its ``STATE/ca/`` (a controller that ran before on files: its CA is migrated, so its enrolled agents keep
  working);
- the others load it; a state dir holding another CA has it set aside into ``STATE/ca/previous-TIME/``;
- the key is sealed with AES-256-GCM under the key-encryption key when one is configured (``ca_kek_file``:
  32 random bytes, base64), else stored as is (docs/security.md says what that means). A CA stored unsealed is
  sealed by the first controller that starts with a key-encryption key.

``STATE/ca/`` then holds ``ca.pem`` (what agents trust, written from the database at each start) and the
controller's own server certificate; the CA key is never written there. On SQLite nothing here runs.

Admin tokens: each controller keeps its own ``STATE/admin.token`` and records its sha256 in ``admin_tokens``;
every controller of the database accepts each recorded one (``is_admin_token``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert

from fleetctl.controller.ca import CertAuthority, new_ca
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import AdminToken, SharedCa
from fleetctl.fleet.errors import AuthError, UsageError

log = logging.getLogger(__name__)

CA_ROW = 1
KEK_BYTES = 32
SEALED = "aes-256-gcm"
UNSEALED = "none"
_AAD = b"fleetctl shared CA key v1"  # binds a sealed key to its use
_KEK_HINT = ("write 32 random bytes, base64, to a file only the controller can read (openssl rand -base64 32 > FILE; "
             "chmod 600 FILE) and give the same file to every controller (ca_kek_file, --ca-kek-file)")


@dataclass(frozen=True)
class Kek:
    """The key-encryption key that seals the CA key in the database."""

    key: bytes

    @property
    def id(self) -> str:
        """Names the key (not secret): says which key sealed a row, so a wrong key is named as such."""
        return hashlib.sha256(b"fleetctl kek id" + self.key).hexdigest()[:16]


def read_kek(path: Path) -> Kek:
    """The key-encryption key in ``path``: base64 (standard or URL-safe) of 32 bytes."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the CA key-encryption key {path}: {exc.strerror or exc}",
                         hint=_KEK_HINT) from None
    try:
        key = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEK_BYTES:
        raise UsageError(f"the CA key-encryption key {path} is not base64 of {KEK_BYTES} bytes", hint=_KEK_HINT)
    return Kek(key)


def seal(key_pem: bytes, kek: Kek) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(kek.key).encrypt(nonce, key_pem, _AAD)


def _unseal(row: SharedCa, kek: Kek | None) -> bytes:
    if row.key_encryption == UNSEALED:
        return row.key_data
    if kek is None:
        raise UsageError(f"the CA key in the database is sealed ({row.key_encryption}, key-encryption key "
                         f"{row.kek_id}), and this controller has no key-encryption key",
                         hint="give this controller the same ca_kek_file (--ca-kek-file) as the others")
    if kek.id != row.kek_id:
        raise AuthError(f"the CA key in the database was sealed with key-encryption key {row.kek_id}, not with this "
                        f"controller's ({kek.id})", hint="give this controller the same ca_kek_file as the others")
    try:
        return AESGCM(kek.key).decrypt(row.key_data[:12], row.key_data[12:], _AAD)
    except InvalidTag:
        raise AuthError("the sealed CA key in the database does not open with the key-encryption key",
                        hint="the row was altered, or sealed under another key of the same id; restore the ca "
                             "table from a backup") from None


def _here(ca_dir: Path) -> str:
    return f"{socket.gethostname()}:{ca_dir.resolve()}"


def _file_ca(ca_dir: Path) -> tuple[bytes, bytes] | None:
    key, cert = ca_dir / "ca.key", ca_dir / "ca.pem"
    if key.is_file() and cert.is_file():
        return key.read_bytes(), cert.read_bytes()
    return None


def _set_aside(ca_dir: Path, cert_pem: bytes) -> None:
    """Move a CA of the state dir that is not the database's into ``previous-TIME/`` (kept, never used)."""
    files = _file_ca(ca_dir)
    if files is None or files[1] == cert_pem:
        return
    previous = ca_dir / f"previous-{utcnow():%Y%m%dT%H%M%S%fZ}"
    previous.mkdir(mode=0o700)
    for name in ("ca.key", "ca.pem", "server.key", "server.pem"):
        if (ca_dir / name).exists():
            os.replace(ca_dir / name, previous / name)
    log.warning("%s held another CA than the database's; moved to %s (agents enrolled under it must enroll again)",
                ca_dir, previous)


def shared_authority(store: Store, ca_dir: Path, kek: Kek | None) -> CertAuthority:
    """The CA of this PostgreSQL database, created (or migrated from ``ca_dir``) if this controller is the first."""
    with store.session() as s:
        row = s.get(SharedCa, CA_ROW)
    if row is None:
        files = _file_ca(ca_dir)
        key_pem, cert_pem = files if files is not None else new_ca()
        origin = f"migrated from {_here(ca_dir)}" if files is not None else f"created by {_here(ca_dir)}"
        now = utcnow()
        with store.session() as s:
            inserted = s.execute(insert(SharedCa).values(
                id=CA_ROW, cert_pem=cert_pem.decode(), key_data=seal(key_pem, kek) if kek else key_pem,
                key_encryption=SEALED if kek else UNSEALED, kek_id=kek.id if kek else "", origin=origin,
                created=now, updated=now).on_conflict_do_nothing(index_elements=["id"]).returning(SharedCa.id))
            won = inserted.first() is not None
        with store.session() as s:
            row = s.get(SharedCa, CA_ROW)
        assert row is not None
        if won and kek:
            log.info("the CA is now in the database (%s; key sealed with key-encryption key %s)", origin, kek.id)
        elif won:
            log.warning("the CA is now in the database (%s) with its key NOT sealed (no ca_kek_file): whoever reads "
                        "the ca table or a backup can sign certificates (docs/security.md, 'The CA on PostgreSQL')",
                        origin)
    key_pem = _unseal(row, kek)
    if kek is not None and row.key_encryption == UNSEALED:
        with store.session() as s:
            s.execute(update(SharedCa).where(SharedCa.id == CA_ROW, SharedCa.key_encryption == UNSEALED).values(
                key_data=seal(key_pem, kek), key_encryption=SEALED, kek_id=kek.id, updated=utcnow()))
        log.info("the CA key in the database is now sealed with key-encryption key %s", kek.id)
    cert_pem = row.cert_pem.encode()
    _set_aside(ca_dir, cert_pem)
    if (ca_dir / "ca.key").exists():
        log.warning("%s still holds the CA key in clear; the database holds the CA now: remove the file once the "
                    "database is backed up", ca_dir / "ca.key")
    return CertAuthority(ca_dir, (key_pem, cert_pem))


def register_admin_token(store: Store, token: str, ca_dir: Path) -> None:
    """Record this controller's admin token (its sha256) so that every controller of the database accepts it."""
    with store.session() as s:
        s.execute(insert(AdminToken).values(sha256=_token_hash(token), controller=_here(ca_dir.parent),
                                            created=utcnow()).on_conflict_do_nothing(index_elements=["sha256"]))


def is_admin_token(store: Store, token: str) -> bool:
    """Whether ``token`` is the admin token of a controller of this database."""
    with store.session() as s:
        return s.scalar(select(AdminToken.sha256).where(AdminToken.sha256 == _token_hash(token))) is not None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def replace_shared_ca(store: Store, key_pem: bytes, bundle_pem: bytes, kek: Kek | None, origin: str) -> None:
    """Make an operator's CA (checked by ``ca.import_ca``) the database's: every controller signs with it from its
    next start. A sealed CA is never replaced by an unsealed one (the key-encryption key is needed)."""
    now = utcnow()
    with store.session() as s:
        row = s.get(SharedCa, CA_ROW, with_for_update=True)
        _refuse_unsealing(row, kek)
        values = {"cert_pem": bundle_pem.decode(), "key_data": seal(key_pem, kek) if kek else key_pem,
                  "key_encryption": SEALED if kek else UNSEALED, "kek_id": kek.id if kek else "",
                  "origin": origin, "updated": now}
        if row is None:
            s.add(SharedCa(id=CA_ROW, created=now, **values))
        else:
            for name, value in values.items():
                setattr(row, name, value)


def check_replaceable(store: Store, kek: Kek | None) -> None:
    """Refuse, before anything changes, an import that would store a sealed CA's successor in clear."""
    with store.session() as s:
        _refuse_unsealing(s.get(SharedCa, CA_ROW), kek)


def _refuse_unsealing(row: SharedCa | None, kek: Kek | None) -> None:
    if row is not None and row.key_encryption != UNSEALED and kek is None:
        raise UsageError(f"the database's CA key is sealed (key-encryption key {row.kek_id}); the imported one "
                         "would be stored in clear", hint="give --ca-kek-file with the controllers' key file")
    if row is not None and row.key_encryption != UNSEALED and kek is not None and kek.id != row.kek_id:
        raise UsageError(f"the database's CA key is sealed with key-encryption key {row.kek_id}, not {kek.id}: the "
                         "other controllers could not open the imported one",
                         hint="give --ca-kek-file with the controllers' key file")

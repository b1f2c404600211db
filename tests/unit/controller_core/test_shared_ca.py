"""The key-encryption key and the sealing of the shared CA key (controller/shared_ca.py), without a database."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from fleetctl.controller.ca import new_ca
from fleetctl.controller.shared_ca import SEALED, UNSEALED, Kek, _unseal, read_kek, seal
from fleetctl.controller.store.models import SharedCa
from fleetctl.fleet.errors import AuthError, UsageError


def row(key_data: bytes, encryption: str, kek_id: str = "") -> SharedCa:
    return SharedCa(id=1, cert_pem="", key_data=key_data, key_encryption=encryption, kek_id=kek_id, origin="t")


def test_read_kek_takes_standard_and_url_safe_base64_of_32_bytes(tmp_path: Path) -> None:
    raw = bytes(range(250, 256)) * 5 + b"\xfb\xff"  # '+' and '/' in standard base64
    (tmp_path / "std").write_text(base64.b64encode(raw).decode() + "\n")
    (tmp_path / "url").write_text(base64.urlsafe_b64encode(raw).decode())
    assert read_kek(tmp_path / "std") == read_kek(tmp_path / "url") == Kek(raw)


@pytest.mark.parametrize("text", ["", "c2hvcnQ=", "not base64 at all!", base64.b64encode(bytes(range(33))).decode()])
def test_read_kek_refuses_anything_but_32_bytes(tmp_path: Path, text: str) -> None:
    (tmp_path / "kek").write_text(text)
    with pytest.raises(UsageError, match="not base64 of 32 bytes") as err:
        read_kek(tmp_path / "kek")
    assert "openssl rand -base64 32" in (err.value.hint or "")


def test_a_missing_kek_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=str(tmp_path / "nope")):
        read_kek(tmp_path / "nope")


def test_sealed_key_opens_only_with_its_kek_and_unaltered() -> None:
    key_pem, _ = new_ca()
    kek, other = Kek(os.urandom(32)), Kek(os.urandom(32))
    sealed = seal(key_pem, kek)
    assert b"PRIVATE KEY" not in sealed and seal(key_pem, kek) != sealed  # a fresh nonce each time
    assert _unseal(row(sealed, SEALED, kek.id), kek) == key_pem
    with pytest.raises(UsageError, match="no key-encryption key"):
        _unseal(row(sealed, SEALED, kek.id), None)
    with pytest.raises(AuthError, match=f"sealed with key-encryption key {kek.id}"):
        _unseal(row(sealed, SEALED, kek.id), other)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(AuthError, match="does not open"):
        _unseal(row(tampered, SEALED, kek.id), kek)
    assert _unseal(row(key_pem, UNSEALED), kek) == key_pem  # stored in clear: read as is (then sealed by the caller)

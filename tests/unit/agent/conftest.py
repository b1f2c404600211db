"""Shared helpers for the agent probe tests: recorded outputs and a scripted command runner."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from fleetctl.agent.probes.system import DEFAULT_TIMEOUT_S, CommandResult

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "probes"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


class ScriptedRunner:
    """Answers commands from a table keyed by argv tuple (or a callable); records every call."""

    def __init__(self, answers: Mapping[tuple[str, ...], CommandResult | Exception]
                 | Callable[[tuple[str, ...]], CommandResult | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[tuple[str, ...], float, Mapping[str, str] | None]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S,
                 env: Mapping[str, str] | None = None) -> CommandResult:
        key = tuple(argv)
        self.calls.append((key, timeout, env))
        answer = self.answers(key) if callable(self.answers) else self.answers.get(key)
        if answer is None:
            raise AssertionError(f"unexpected command {key}")
        if isinstance(answer, Exception):
            raise answer
        return answer


def ok(argv: Sequence[str], stdout: str = "", stderr: str = "", rc: int = 0) -> CommandResult:
    return CommandResult(tuple(argv), rc, stdout, stderr)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def self_signed_pem(name: str = "node-1", days: int = 30) -> bytes:
    """A PEM certificate valid from an hour ago for ``days``: enough for the agent's run loop, which reads the expiry
    of its certificate before its first session."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)

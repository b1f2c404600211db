"""Optional OpenPGP signature checks for operator-added artifacts (``fleetctl artifact add FILE --sig FILE.sig``).

The controller started with ``--trusted-keyring FILE`` (public keys of the operators allowed to vouch for
files, as ``gpg --export [--armor]`` writes them) imports that keyring at start into a private GnuPG home
(``STATE/gnupg``, 0700, rebuilt at every start, so the keyring file is the only source of trust) and checks
each detached signature sent with an upload by running ``gpg --verify`` in a subprocess with that home. Every
key in the keyring is trusted (``--trust-model always``); any other key, a bad, expired or revoked signature,
or something that is not an OpenPGP signature refuses the upload (``SignatureError``: nothing is stored).
A good one records the signer's primary-key fingerprint in the artifact's ``user`` provenance.
With ``--require-signed`` an upload without a signature is refused too. Without a keyring no signature is
checked, and an upload that brings one is refused (its sender expects a check this controller cannot make).

Bundle imports (``fleetctl bundle import``) are checked against the bundle's lock, not by signature.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fleetctl.fleet.errors import InputError, UsageError

log = logging.getLogger(__name__)

MAX_SIGNATURE_BYTES = 8 * 1024  # a detached signature is a few hundred bytes (armored: under 1 KiB)
GPG_TIMEOUT_S = 30.0
SIGN_HINT = ("sign it with an operator key in the controller's trusted keyring (gpg --detach-sign FILE) and add "
             "it with --sig FILE.sig")


class SignatureError(InputError):
    """An artifact's signature is missing, bad or not from a trusted key: the upload is refused."""

    code = "bad-signature"


@dataclass(frozen=True)
class Signer:
    """Who signed: the primary key's fingerprint, the signing (sub)key's, and the user id gpg reports."""

    fingerprint: str
    signing_key: str
    uid: str

    def detail(self) -> dict[str, str]:
        """What ``Provenance.user`` records."""
        d = {"signature": "openpgp", "signer": self.fingerprint, "signer_uid": self.uid[:256]}
        if self.signing_key != self.fingerprint:
            d["signing_key"] = self.signing_key
        return d


def _gpg() -> str:
    path = shutil.which("gpg")
    if path is None:
        raise UsageError("--trusted-keyring needs gpg, which is not installed",
                         hint="install gnupg (scripts/bootstrap does), or start the controller without "
                              "--trusted-keyring")
    return path


class SignaturePolicy:
    """The controller's signature rules: no keyring (nothing checked), or a keyring and maybe ``require_signed``."""

    def __init__(self, home: Path | None = None, fingerprints: tuple[str, ...] = (), *,
                 require_signed: bool = False, keyring: Path | None = None) -> None:
        self.home = home
        self.fingerprints = fingerprints
        self.require_signed = require_signed
        self.keyring = keyring

    @property
    def enabled(self) -> bool:
        return self.home is not None

    @classmethod
    def create(cls, keyring: Path | None, require_signed: bool, home: Path) -> SignaturePolicy:
        """Import ``keyring`` into a fresh private GnuPG home at ``home``; ``UsageError`` when it holds no key."""
        if keyring is None:
            if require_signed:
                raise UsageError("--require-signed needs --trusted-keyring FILE (the keys a signature must come "
                                 "from)", hint="export the operators' public keys: gpg --export --armor KEYID... "
                                               "> operators.asc, then --trusted-keyring operators.asc")
            return cls()
        if not keyring.is_file():
            raise UsageError(f"--trusted-keyring {keyring}: no such file",
                             hint="export the operators' public keys: gpg --export --armor KEYID... > FILE")
        gpg = _gpg()
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(mode=0o700, parents=True)
        imported = subprocess.run([gpg, "--batch", "--no-autostart", "--homedir", str(home), "--import",
                                   "--import-options", "import-minimal", str(keyring.resolve())],
                                  capture_output=True, text=True, timeout=GPG_TIMEOUT_S, check=False)
        listed = subprocess.run([gpg, "--batch", "--no-autostart", "--homedir", str(home), "--with-colons",
                                 "--list-keys"], capture_output=True, text=True, timeout=GPG_TIMEOUT_S, check=False)
        fprs = _primary_fingerprints(listed.stdout)
        if not fprs:
            detail = (imported.stderr.strip().splitlines() or ["no key imported"])[-1]
            raise UsageError(f"--trusted-keyring {keyring} holds no OpenPGP public key ({detail})",
                             hint="export the operators' public keys: gpg --export --armor KEYID... > FILE")
        log.info("signature checks on: %d trusted key(s) from %s (%s)%s", len(fprs), keyring, ", ".join(fprs),
                 "; unsigned uploads refused" if require_signed else "")
        return cls(home, tuple(fprs), require_signed=require_signed, keyring=keyring)

    def check(self, data: Path, signature: bytes | None, filename: str) -> Signer | None:
        """The signer of ``data`` (``None``: unsigned and allowed); ``SignatureError`` refuses the upload.

        Blocking (runs gpg): call it off the event loop."""
        if signature is None:
            if self.require_signed:
                raise SignatureError(f"{filename}: unsigned upload refused: this controller accepts only files "
                                     "signed by a key in its trusted keyring (--require-signed)", hint=SIGN_HINT)
            return None
        if self.home is None:
            raise SignatureError(f"{filename}: a signature was sent, but this controller checks none (it was "
                                 "started without --trusted-keyring); nothing stored",
                                 hint="start the controller with --trusted-keyring FILE, or add the file without "
                                      "--sig")
        if not signature or len(signature) > MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{filename}: the signature has {len(signature)} bytes; a detached OpenPGP "
                                 f"signature is 1 to {MAX_SIGNATURE_BYTES} bytes", hint=SIGN_HINT)
        with tempfile.NamedTemporaryFile(dir=self.home, prefix="sig-", suffix=".sig") as sig:
            sig.write(signature)
            sig.flush()
            try:
                proc = subprocess.run(
                    [_gpg(), "--batch", "--no-autostart", "--homedir", str(self.home), "--trust-model", "always",
                     "--status-fd", "1", "--verify", sig.name, str(data)],
                    capture_output=True, text=True, timeout=GPG_TIMEOUT_S, check=False,
                    env={**os.environ, "GNUPGHOME": str(self.home), "LC_ALL": "C"})
            except subprocess.TimeoutExpired as exc:
                raise SignatureError(f"{filename}: gpg --verify did not finish within {GPG_TIMEOUT_S:g} s; "
                                     "nothing stored", hint="try again; check the controller host's load") from exc
        return judge(proc.returncode, proc.stdout, filename, proc.stderr)


def _primary_fingerprints(colons: str) -> list[str]:
    """Primary keys' fingerprints from ``gpg --with-colons --list-keys`` (the ``fpr`` line after each ``pub``)."""
    out: list[str] = []
    want = False
    for line in colons.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            want = True
        elif fields[0] == "fpr" and want and len(fields) > 9:
            out.append(fields[9])
            want = False
        elif fields[0] == "sub":
            want = False
    return out


def judge(returncode: int, status: str, filename: str, stderr: str = "") -> Signer:
    """Decide from ``gpg --status-fd`` output: every signature good and from a trusted key, or refused."""
    lines = [ln.split()[1:] for ln in status.splitlines() if ln.startswith("[GNUPG:] ") and len(ln.split()) > 1]
    by = {k[0]: k[1:] for k in lines}
    refuse = f"{filename}: signature refused, nothing stored: "
    if "ERRSIG" in by:
        args = by["ERRSIG"]
        key = args[0] if args else "?"
        fpr = args[6] if len(args) > 6 and args[6] != "-" else key
        if (len(args) > 5 and args[5] == "9") or "NO_PUBKEY" in by:
            raise SignatureError(refuse + f"signed by key {fpr}, which is not in the controller's trusted keyring",
                                 hint="sign with an operator key in the keyring, or add this key to the keyring "
                                      "(--trusted-keyring) and restart the controller")
        raise SignatureError(refuse + f"gpg could not check the signature by key {fpr} (error code "
                             f"{args[5] if len(args) > 5 else '?'})", hint=SIGN_HINT)
    for word, what in (("BADSIG", "does not match the file (modified, or signed a different file)"),
                       ("EXPKEYSIG", "was made by an expired key"), ("REVKEYSIG", "was made by a revoked key"),
                       ("EXPSIG", "has expired")):
        if word in by:
            key = by[word][0] if by[word] else "?"
            raise SignatureError(refuse + f"the signature by key {key} {what}", hint=SIGN_HINT)
    valid = by.get("VALIDSIG")
    if returncode != 0 or valid is None or "GOODSIG" not in by:
        last = (stderr.strip().splitlines() or ["no signature found"])[-1]
        raise SignatureError(refuse + f"not a valid detached OpenPGP signature of this file (gpg: {last[:200]})",
                             hint=SIGN_HINT)
    signing_key = valid[0]
    primary = valid[9] if len(valid) > 9 else signing_key
    uid = " ".join(by["GOODSIG"][1:])
    return Signer(fingerprint=primary, signing_key=signing_key, uid=uid)

"""Enrollment tokens, agent identities, the approval queue, certificate renewal and revocation.

``fleetctl tokens create`` → ``Enrollment.create_token`` gives a token (only its sha256 is
stored): one-time by default, or good for ``--uses N`` enrollments, optionally only for hostnames
matching a glob and from a source network. An agent calls the ``Enroll`` RPC with the token, its
hostname and a CSR; ``Enrollment.enroll`` checks the token (known, not revoked, not used up, not
expired, hostname and source allowed), counts the use with one conditional UPDATE (two agents
racing for the last use: one wins), binds the hostname to a new identity (agent id = certificate
CN) and signs the CSR. Every refusal raises ``AuthError`` with a hint saying what to do (or
``ConflictError`` for a hostname already held by a live identity) and is written to the audit log.

Approval queue: a token created with ``--approval`` (or every token, with the controller's
``--enroll-approval``) makes the identity ``pending``: nothing is signed, the agent gets a secret
and polls ``Enroll`` with it until an operator runs ``fleetctl agents approve HOST`` (the CSR is
signed then) or ``deny HOST``. Renewal: an enrolled agent sends a CSR over its mTLS channel
(``renew``); the new certificate becomes the identity's, the one it replaces stays accepted until
it expires, so calls in flight on the old channel are not refused.

``IdentityCache`` maps a client certificate (CN + serial) to the identity on every RPC
without touching the database in the common case: it loads identities on a miss and
reloads the revoked set every ``REFRESH_SECONDS`` (revocations made by this controller take
effect at once; by another controller sharing the database within that period).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import fnmatch
import hashlib
import ipaddress
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleetctl.controller.audit import AuditCoalescer, audit
from fleetctl.controller.ca import CLIENT_LIFETIME, CertAuthority, IssuedCert
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.ratelimit import source_address
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import EnrollmentToken, Identity, Node
from fleetctl.fleet.errors import AuthError, ConflictError, InputError, NotFoundError
from fleetctl.fleet.facts import HOSTNAME_RE
from fleetctl.fleet.text import safe_text

log = logging.getLogger(__name__)

TOKEN_PREFIX = "fleet_"
DEFAULT_TOKEN_TTL = dt.timedelta(hours=24)
REFRESH_SECONDS = 2.0
# input caps, checked before any work: a token is ``fleet_`` + 43 characters; a CSR with one EC key is < 1 KB
MAX_TOKEN_CHARS = 128
MAX_HOSTNAME_CHARS = 253
MAX_CSR_BYTES = 16 * 1024
REFUSAL_AUDIT_WINDOW = 60.0  # one enroll.refused row per source address per minute, with a count
MAX_TOKEN_USES = 100_000
# a glob over hostname characters: '*', '?' and '[...]' classes, nothing that could mean more
HOSTNAME_PATTERN_RE = re.compile(r"[A-Za-z0-9.*?\[\]_!-]{1,253}")
NEW_TOKEN_HINT = "create a new one with `fleetctl tokens create` (see `--uses`, `--ttl`) and give it to the agent"


class IdentityState(enum.StrEnum):
    """An identity's place in enrollment (``identities.state``)."""

    ACTIVE = "active"  # certificate issued: the agent works
    PENDING = "pending"  # enrolled with an approval token: waits for `fleetctl agents approve HOST`
    DENIED = "denied"  # an operator said no (also revoked)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class AgentIdentity:
    agent_id: str
    hostname: str
    cert_serial: str
    revoked: bool
    prev_cert_serial: str = ""  # replaced by a renewal, still accepted until it expires (TLS checks that)


@dataclass(frozen=True)
class EnrollResult:
    """A signed certificate, or (``pending``) the secret the agent polls with until an operator decides."""

    agent_id: str
    hostname: str
    certificate_pem: bytes
    ca_pem: bytes
    pending_secret: str = ""

    @property
    def pending(self) -> bool:
        return bool(self.pending_secret)


@dataclass(frozen=True)
class TokenLimits:
    """What a token allows beyond its TTL: how many enrollments, which hostnames, from where, with approval."""

    uses: int = 1
    hostname: str | None = None  # exactly this hostname
    hostname_pattern: str | None = None  # a glob: 'gpu-*'
    source_network: str | None = None  # CIDR: '10.0.0.0/8'
    approval: bool = False

    def checked(self) -> TokenLimits:
        """The same limits, validated and normalised (``InputError`` saying what is wrong)."""
        if not 1 <= self.uses <= MAX_TOKEN_USES:
            raise InputError(f"token uses {self.uses} out of range", hint=f"use --uses 1..{MAX_TOKEN_USES}")
        if self.hostname is not None and not HOSTNAME_RE.fullmatch(self.hostname):
            raise InputError(f"{self.hostname!r} is not a valid hostname", hint="letters, digits, '.', '-', '_'")
        if self.hostname_pattern is not None and not HOSTNAME_PATTERN_RE.fullmatch(self.hostname_pattern):
            raise InputError(f"{self.hostname_pattern[:80]!r} is not a hostname pattern",
                             hint="a glob of hostname characters with * ? [..], e.g. 'gpu-*' or 'rack[12]-*'")
        network = None
        if self.source_network is not None:
            try:
                network = str(ipaddress.ip_network(self.source_network.strip(), strict=False))
            except ValueError as exc:
                raise InputError(f"--source-network {self.source_network[:80]!r}: {exc}",
                                 hint="a network in CIDR form, e.g. 10.0.0.0/8 or 192.168.4.0/24") from None
        return TokenLimits(self.uses, self.hostname, self.hostname_pattern, network, self.approval)


def token_to_json(row: EnrollmentToken, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    state = ("revoked" if row.revoked else "used" if row.uses >= row.max_uses else "expired"
             if row.expires_at <= now else "active")
    return {"id": row.id, "prefix": row.prefix, "hostname": row.hostname, "state": state,
            "created_at": row.created_at.isoformat(), "expires_at": row.expires_at.isoformat(),
            "used_at": row.used_at.isoformat() if row.used_at else None, "used_by": row.used_by,
            "uses": row.uses, "max_uses": row.max_uses, "hostname_pattern": row.hostname_pattern,
            "source_network": row.source_network, "approval": row.approval}


def pending_to_json(row: Identity) -> dict[str, Any]:
    """An enrollment waiting in the approval queue (``fleetctl agents pending``)."""
    return {"hostname": row.hostname, "agent_id": row.id, "requested_at": row.created_at.isoformat(),
            "source": row.source, "token_id": row.token_id}


def _in_network(peer_address: str, network: str) -> bool:
    try:
        return ipaddress.ip_address(peer_address) in ipaddress.ip_network(network)
    except ValueError:  # not an IP address (a unix socket peer): not in any network
        return False


class Enrollment:
    def __init__(self, store: Store, ca: CertAuthority, *, approval_required: bool = False,
                 cert_lifetime: dt.timedelta = CLIENT_LIFETIME) -> None:
        self.store = store
        self.ca = ca
        self.approval_required = approval_required  # every enrollment waits for an operator (--enroll-approval)
        self.cert_lifetime = cert_lifetime  # of agents' certificates (--agent-cert-lifetime)
        self.identities = IdentityCache(store)
        self.refusals = AuditCoalescer(REFUSAL_AUDIT_WINDOW)

    # ---- tokens ------------------------------------------------------------------------

    def create_token(self, ttl: dt.timedelta = DEFAULT_TOKEN_TTL, hostname: str | None = None,
                     actor: str = "admin", limits: TokenLimits | None = None) -> tuple[str, dict[str, Any]]:
        """A new token (plaintext, shown once) and its listing entry; one-time unless ``limits`` say more."""
        if ttl.total_seconds() <= 0 or ttl > dt.timedelta(days=365):
            raise InputError(f"token TTL {ttl} out of range", hint="use a TTL between 1s and 365 days")
        limits = (limits or TokenLimits(hostname=hostname)).checked()
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        with self.store.session() as s:
            row = EnrollmentToken(token_hash=hash_token(token), prefix=token[:12], hostname=limits.hostname,
                                  created_at=now, expires_at=now + ttl, revoked=False, max_uses=limits.uses,
                                  uses=0, hostname_pattern=limits.hostname_pattern,
                                  source_network=limits.source_network, approval=limits.approval)
            s.add(row)
            s.flush()
            listing = token_to_json(row, now)
        audit(self.store, actor, "token.create", f"token:{listing['id']}", hostname=limits.hostname,
              expires_at=listing["expires_at"], uses=limits.uses, hostname_pattern=limits.hostname_pattern,
              source_network=limits.source_network, approval=limits.approval)
        return token, listing

    def list_tokens(self) -> list[dict[str, Any]]:
        now = utcnow()
        with self.store.session() as s:
            return [token_to_json(r, now) for r in s.scalars(select(EnrollmentToken).order_by(EnrollmentToken.id))]

    def revoke_token(self, token_ref: str, actor: str = "admin") -> dict[str, Any]:
        """Revoke by id, prefix or the token itself."""
        with self.store.session() as s:
            q = select(EnrollmentToken)
            if token_ref.isdigit():
                q = q.where(EnrollmentToken.id == int(token_ref))
            elif token_ref.startswith(TOKEN_PREFIX) and len(token_ref) > 20:
                q = q.where(EnrollmentToken.token_hash == hash_token(token_ref))
            else:
                q = q.where(EnrollmentToken.prefix == token_ref)
            rows = s.scalars(q).all()
            if len(rows) != 1:
                raise NotFoundError(f"no single token matches {token_ref!r}",
                                    hint="give the id shown by `fleetctl token list`")
            rows[0].revoked = True
            listing = token_to_json(rows[0])
        audit(self.store, actor, "token.revoke", f"token:{listing['id']}")
        return listing

    # ---- enrollment --------------------------------------------------------------------

    def _audit_refusal(self, peer: str, hostname: str, **detail: Any) -> None:
        """An ``enroll.refused`` row — at most one per source address per minute, counting the rest (an
        unauthenticated flood must not fill the audit table)."""
        source = source_address(peer)
        skipped = self.refusals.admit(source)
        if skipped is None:
            log.debug("enroll refused for %s from %s: %s (audit row coalesced)", safe_text(hostname, 80),
                      safe_text(peer, 80), safe_text(detail.get("reason", ""), 200))
            return
        if skipped:
            detail["coalesced"] = skipped  # refusals from this source not written since the last row
        audit(self.store, f"peer:{peer}", "enroll.refused", hostname[:MAX_HOSTNAME_CHARS], level=logging.WARNING,
              source=source, **detail)

    def _refuse(self, peer: str, reason: str, hostname: str, hint: str = NEW_TOKEN_HINT, **detail: Any) -> AuthError:
        self._audit_refusal(peer, hostname, reason=reason, **detail)
        return AuthError(f"enrollment refused: {reason}", hint=hint)

    def _token_refusal(self, row: EnrollmentToken, hostname: str, source: str, now: dt.datetime) -> tuple[str, str]:
        """(reason, hint) when ``row`` may not enroll ``hostname`` from ``source`` now, else ("", "")."""
        if row.revoked:
            return "token revoked", NEW_TOKEN_HINT
        if row.uses >= row.max_uses:
            if row.max_uses == 1:
                return "token already used (replayed enrollment)", NEW_TOKEN_HINT
            return (f"token used up (all {row.max_uses} uses spent)",
                    "create a new token with more uses (`fleetctl tokens create --uses N`)")
        if row.expires_at <= now:
            return (f"token expired at {row.expires_at.isoformat(timespec='seconds')}",
                    "create a new token (`fleetctl tokens create --ttl 24h`) and give it to the agent")
        if row.hostname and row.hostname != hostname:
            return f"token is for host {row.hostname}, not {hostname}", NEW_TOKEN_HINT
        if row.hostname_pattern and not fnmatch.fnmatchcase(hostname, row.hostname_pattern):
            return (f"token is for hostnames matching {row.hostname_pattern!r}, not {hostname}",
                    "enroll with a matching --hostname, or use a token whose --hostname-pattern covers this host")
        if row.source_network and not _in_network(source, row.source_network):
            return (f"token is for agents in {row.source_network}, and this one connects from {source}",
                    "enroll from that network, or use a token created with a --source-network that covers "
                    "this address (NAT and proxies change the address the controller sees)")
        return "", ""

    def enroll(self, token: str, hostname: str, csr_pem: bytes, peer: str = "unknown",
               pending_secret: str = "") -> EnrollResult:
        if pending_secret:
            return self._poll_pending(pending_secret, hostname, peer)
        if not token:
            raise self._refuse(peer, "no enrollment token", hostname[:MAX_HOSTNAME_CHARS])
        if len(token) > MAX_TOKEN_CHARS:
            raise self._refuse(peer, f"token of {len(token)} characters (tokens have at most {MAX_TOKEN_CHARS})",
                               hostname[:MAX_HOSTNAME_CHARS])
        if not hostname or len(hostname) > MAX_HOSTNAME_CHARS or not HOSTNAME_RE.fullmatch(hostname):
            self._audit_refusal(peer, hostname, reason="invalid hostname")
            raise InputError(f"enrollment refused: {hostname[:80]!r} is not a valid hostname",
                             hint="letters, digits, '.', '-', '_'")
        if len(csr_pem) > MAX_CSR_BYTES:
            self._audit_refusal(peer, hostname, reason=f"CSR of {len(csr_pem)} bytes")
            raise InputError(f"enrollment refused: a CSR of {len(csr_pem)} bytes (at most {MAX_CSR_BYTES})",
                             hint="send one PEM certificate request for an EC or RSA key")
        now = utcnow()
        agent_id = uuid.uuid4().hex
        source = source_address(peer)
        with self.store.session() as s:
            row = s.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token)))
            if row is None:
                raise self._refuse(peer, "wrong token", hostname)
            detail = {"token_id": row.id}
            reason, hint = self._token_refusal(row, hostname, source, now)
            if reason:
                raise self._refuse(peer, reason, hostname, hint, **detail)
            holder = s.scalar(select(Identity).where(Identity.hostname == hostname, Identity.revoked.is_(False)))
            if holder is not None:
                self._audit_refusal(peer, hostname, reason="hostname held by another identity", holder=holder.id,
                                    **detail)
                if holder.state == IdentityState.PENDING:
                    raise ConflictError(f"enrollment refused: an enrollment of {hostname} is already waiting for "
                                        "approval", hint=f"run `fleetctl agents approve {hostname}` or `fleetctl "
                                        f"agents deny {hostname}`; a denied host may enroll again")
                raise ConflictError(f"enrollment refused: hostname {hostname} is already enrolled "
                                    f"(agent {holder.id[:12]})",
                                    hint=f"if the node was reinstalled, run `fleetctl agent revoke {hostname}` "
                                         "first, then enroll with a new token")
            pending = row.approval or self.approval_required
            # sign before counting the use (a bad CSR must not spend it); an approval waits with the CSR unsigned
            issued = None if pending else self.ca.sign_csr(csr_pem, agent_id, self.cert_lifetime)
            if pending:
                self.ca.check_csr(csr_pem)
            # count the use atomically: of agents racing for the last use, exactly one passes this UPDATE
            res = s.execute(update(EnrollmentToken)
                            .where(EnrollmentToken.id == row.id, EnrollmentToken.uses < EnrollmentToken.max_uses,
                                   EnrollmentToken.revoked.is_(False))
                            .values(uses=EnrollmentToken.uses + 1, used_at=now, used_by=agent_id))
            if getattr(res, "rowcount", 1) != 1:
                s.rollback()
                raise self._refuse(peer, f"token used up (all {row.max_uses} uses spent)" if row.max_uses > 1
                                   else "token already used (replayed enrollment)", hostname,
                                   "create a new token with more uses (`fleetctl tokens create --uses N`)"
                                   if row.max_uses > 1 else NEW_TOKEN_HINT, **detail)
            secret = secrets.token_urlsafe(32) if pending else ""
            s.add(Identity(id=agent_id, hostname=hostname, cert_serial=issued.serial if issued else "",
                           cert_fingerprint=issued.fingerprint if issued else "", created_at=now, revoked=False,
                           token_id=row.id, source=source[:64],
                           state=IdentityState.PENDING if pending else IdentityState.ACTIVE,
                           csr_pem=csr_pem.decode("ascii", "replace") if pending else None,
                           pending_hash=hash_token(secret) if pending else None,
                           cert_not_after=issued.not_after if issued else None))
        if issued is None:
            audit(self.store, f"peer:{peer}", "enroll.pending", hostname, agent=agent_id, token_id=row.id,
                  source=source)
            return EnrollResult(agent_id, hostname, b"", self.ca.ca_pem, pending_secret=secret)
        audit(self.store, f"agent:{agent_id}", "enroll", hostname, token_id=detail["token_id"],
              serial=issued.serial)
        return EnrollResult(agent_id, hostname, issued.pem, self.ca.ca_pem)

    # ---- the approval queue ------------------------------------------------------------

    def _poll_pending(self, secret: str, hostname: str, peer: str) -> EnrollResult:
        """A waiting agent asks again: still pending, its certificate (approved), or ``AuthError`` (denied)."""
        if len(secret) > MAX_TOKEN_CHARS:
            raise self._refuse(peer, "unknown enrollment request", hostname[:MAX_HOSTNAME_CHARS])
        with self.store.session() as s:
            row = s.scalar(select(Identity).where(Identity.pending_hash == hash_token(secret)))
            if row is None or row.hostname != hostname:
                raise self._refuse(peer, "unknown enrollment request (it was removed, or is for another host)",
                                   hostname[:MAX_HOSTNAME_CHARS],
                                   "remove the agent's pending.json and enroll again with a token")
            if row.state == IdentityState.DENIED:
                raise AuthError(f"enrollment of {hostname} was denied by an operator",
                                hint="ask the controller's operators; a new enrollment needs a new token")
            if row.state == IdentityState.PENDING:
                return EnrollResult(row.id, row.hostname, b"", self.ca.ca_pem, pending_secret=secret)
            if row.revoked or not row.cert_pem:
                raise AuthError(f"agent identity {row.id} ({hostname}) is revoked",
                                hint="enroll again with a fresh token (`fleetctl tokens create`)")
            return EnrollResult(row.id, row.hostname, row.cert_pem.encode(), self.ca.ca_pem)

    def pending(self) -> list[dict[str, Any]]:
        with self.store.session() as s:
            rows = s.scalars(select(Identity).where(Identity.state == IdentityState.PENDING)
                             .order_by(Identity.created_at)).all()
            return [pending_to_json(r) for r in rows]

    def _pending_row(self, s: Session, hostname: str) -> Identity:
        row = s.scalar(select(Identity).where(Identity.hostname == hostname, Identity.state == IdentityState.PENDING))
        if row is None:
            raise NotFoundError(f"no enrollment of {hostname!r} is waiting for approval",
                                hint="see `fleetctl agents pending`")
        return row

    def approve(self, hostname: str, actor: str = "admin") -> dict[str, Any]:
        """Sign the waiting request of ``hostname``; its agent picks the certificate up on its next poll."""
        with self.store.session() as s:
            row = self._pending_row(s, hostname)
            issued = self.ca.sign_csr((row.csr_pem or "").encode(), row.id, self.cert_lifetime)
            row.state, row.csr_pem, row.cert_pem = IdentityState.ACTIVE, None, issued.pem.decode()
            row.cert_serial, row.cert_fingerprint, row.cert_not_after = issued.serial, issued.fingerprint, \
                issued.not_after
            listing = pending_to_json(row)
        audit(self.store, actor, "agent.approve", hostname, agent=listing["agent_id"], serial=issued.serial)
        return listing

    def deny(self, hostname: str, actor: str = "admin") -> dict[str, Any]:
        """Refuse the waiting request of ``hostname``: its agent stops with an error saying so."""
        with self.store.session() as s:
            row = self._pending_row(s, hostname)
            row.state, row.csr_pem, row.revoked, row.revoked_at = IdentityState.DENIED, None, True, utcnow()
            listing = pending_to_json(row)
        self.identities.mark_revoked(listing["agent_id"])
        audit(self.store, actor, "agent.deny", hostname, agent=listing["agent_id"])
        return listing

    # ---- renewal -----------------------------------------------------------------------

    def renew(self, ident: AgentIdentity, csr_pem: bytes) -> IssuedCert:
        """A new certificate for an authenticated agent (the same identity and CN). The replaced one stays
        accepted until it expires (calls in flight on the agent's old channel are not refused); any older
        one is refused from now on."""
        issued = self.ca.sign_csr(csr_pem, ident.agent_id, self.cert_lifetime)
        with self.store.session() as s:
            res = s.execute(update(Identity)
                            .where(Identity.id == ident.agent_id, Identity.revoked.is_(False),
                                   Identity.cert_serial == ident.cert_serial)
                            .values(cert_serial=issued.serial, cert_fingerprint=issued.fingerprint,
                                    cert_not_after=issued.not_after, prev_cert_serial=ident.cert_serial,
                                    cert_pem=None))
            if getattr(res, "rowcount", 1) != 1:
                raise ConflictError(f"certificate of agent {ident.agent_id} changed meanwhile",
                                    hint="the agent retries its renewal with the certificate it holds now")
        self.identities.renewed(ident.agent_id, issued.serial, ident.cert_serial)
        audit(self.store, f"agent:{ident.agent_id}", "agent.renew", ident.hostname, serial=issued.serial,
              replaced=ident.cert_serial, not_after=issued.not_after.isoformat())
        return issued

    # ---- revocation --------------------------------------------------------------------

    def revoke_agent(self, hostname: str, actor: str = "admin") -> list[str]:
        """Revoke every live identity bound to ``hostname``; returns their ids."""
        with self.store.session() as s:
            rows = s.scalars(select(Identity).where(Identity.hostname == hostname, Identity.revoked.is_(False))).all()
            if not rows:
                raise NotFoundError(f"no enrolled agent for host {hostname!r}",
                                    hint="see `fleetctl nodes`; nothing to revoke")
            now = utcnow()
            ids = []
            for r in rows:
                r.revoked = True
                r.revoked_at = now
                ids.append(r.id)
            node = s.scalar(select(Node).where(Node.hostname == hostname))
            if node is not None and node.status != NodeStatus.OFFLINE:
                node.status = NodeStatus.OFFLINE
                node.status_changed_at = now
        for agent_id in ids:
            self.identities.mark_revoked(agent_id)
        audit(self.store, actor, "agent.revoke", hostname, agents=ids)
        return ids


class IdentityCache:
    """Peer certificate → identity, checked on every RPC (revocation included)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._by_id: dict[str, AgentIdentity] = {}
        self._refreshed = 0.0
        # set by the controller's housekeeping, which then calls refresh() off the event loop: an RPC never
        # waits on the database for the revoked set (a blocked database must not stop heartbeats)
        self.refresh_in_background = False

    def cached(self, agent_id: str) -> AgentIdentity | None:
        """The identity if ``lookup`` can answer from memory alone, else None."""
        if not self.refresh_in_background and time.monotonic() - self._refreshed > REFRESH_SECONDS:
            return None
        return self._by_id.get(agent_id)

    def mark_revoked(self, agent_id: str) -> None:
        ident = self._by_id.get(agent_id)
        if ident is not None:
            self._by_id[agent_id] = dataclasses.replace(ident, revoked=True)

    def renewed(self, agent_id: str, serial: str, previous: str) -> None:
        ident = self._by_id.get(agent_id)
        if ident is not None:
            self._by_id[agent_id] = dataclasses.replace(ident, cert_serial=serial, prev_cert_serial=previous)

    def knows(self, agent_id: str, serial: str) -> bool:
        """Whether memory alone can authenticate ``serial`` for ``agent_id`` (a serial it does not know may be a
        renewal made by another controller sharing the database: ``authenticate`` then reads the identity)."""
        ident = self.cached(agent_id)
        return ident is not None and serial in (ident.cert_serial, ident.prev_cert_serial)

    def refresh(self) -> None:
        with self.store.session() as s:
            revoked = set(s.scalars(select(Identity.id).where(Identity.revoked.is_(True))))
        for agent_id in revoked & self._by_id.keys():
            self.mark_revoked(agent_id)
        self._refreshed = time.monotonic()

    def lookup(self, agent_id: str, reload: bool = False) -> AgentIdentity | None:
        if not self.refresh_in_background and time.monotonic() - self._refreshed > REFRESH_SECONDS:
            self.refresh()
        ident = None if reload else self._by_id.get(agent_id)
        if ident is None:
            with self.store.session() as s:
                row = s.get(Identity, agent_id)
                if row is None:
                    return None
                ident = AgentIdentity(row.id, row.hostname, row.cert_serial,
                                      row.revoked or row.state != IdentityState.ACTIVE, row.prev_cert_serial or "")
            self._by_id[agent_id] = ident
        return ident

    def authenticate(self, agent_id: str, serial: str | None) -> AgentIdentity:
        """The identity for a verified client certificate, or ``AuthError`` (unknown / revoked / stale cert)."""
        ident = self.lookup(agent_id) if agent_id else None
        if ident is None:
            raise AuthError(f"unknown agent identity {agent_id[:64]!r}",
                            hint="enroll the agent again with a fresh token (`fleetctl token create`)")
        if ident.revoked:
            raise AuthError(f"agent identity {agent_id} ({ident.hostname}) is revoked",
                            hint="enroll the agent again with a fresh token (`fleetctl token create`)")
        if serial is not None and serial not in (ident.cert_serial, ident.prev_cert_serial):
            ident = self.lookup(agent_id, reload=True) or ident  # renewed through another controller?
        if serial is not None and (not serial or serial not in (ident.cert_serial, ident.prev_cert_serial)):
            raise AuthError(f"certificate serial {serial} is not the one issued to agent {agent_id}",
                            hint="enroll the agent again with a fresh token")
        return ident

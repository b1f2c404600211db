"""Enrollment tokens, agent identities and revocation.

``fleetctl token create`` → ``Enrollment.create_token`` gives a one-time token (only its
sha256 is stored). An agent calls the ``Enroll`` RPC with the token, its hostname and a CSR;
``Enrollment.enroll`` checks the token (present, known, not expired, not revoked, not used
before), binds the hostname to a new identity (agent id = certificate CN) and signs the CSR.
Every refusal raises ``AuthError`` (or ``ConflictError`` for a hostname already held by a
live identity) and is written to the audit log.

``IdentityCache`` maps a client certificate (CN + serial) to the identity on every RPC
without touching the database in the common case: it loads identities on a miss and
reloads the revoked set every ``REFRESH_SECONDS`` (revocations made by this controller take
effect at once; by another controller sharing the database within that period).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from fleetctl.controller.audit import AuditCoalescer, audit
from fleetctl.controller.ca import CertAuthority
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


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class AgentIdentity:
    agent_id: str
    hostname: str
    cert_serial: str
    revoked: bool


@dataclass(frozen=True)
class EnrollResult:
    agent_id: str
    hostname: str
    certificate_pem: bytes
    ca_pem: bytes


def token_to_json(row: EnrollmentToken, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    state = ("revoked" if row.revoked else "used" if row.used_at else "expired" if row.expires_at <= now
             else "active")
    return {"id": row.id, "prefix": row.prefix, "hostname": row.hostname, "state": state,
            "created_at": row.created_at.isoformat(), "expires_at": row.expires_at.isoformat(),
            "used_at": row.used_at.isoformat() if row.used_at else None, "used_by": row.used_by}


class Enrollment:
    def __init__(self, store: Store, ca: CertAuthority) -> None:
        self.store = store
        self.ca = ca
        self.identities = IdentityCache(store)
        self.refusals = AuditCoalescer(REFUSAL_AUDIT_WINDOW)

    # ---- tokens ------------------------------------------------------------------------

    def create_token(self, ttl: dt.timedelta = DEFAULT_TOKEN_TTL, hostname: str | None = None,
                     actor: str = "admin") -> tuple[str, dict[str, Any]]:
        """A new one-time token (plaintext, shown once) and its listing entry."""
        if ttl.total_seconds() <= 0 or ttl > dt.timedelta(days=365):
            raise InputError(f"token TTL {ttl} out of range", hint="use a TTL between 1s and 365 days")
        if hostname is not None and not HOSTNAME_RE.match(hostname):
            raise InputError(f"{hostname!r} is not a valid hostname", hint="letters, digits, '.', '-', '_'")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        with self.store.session() as s:
            row = EnrollmentToken(token_hash=hash_token(token), prefix=token[:12], hostname=hostname,
                                  created_at=now, expires_at=now + ttl, revoked=False)
            s.add(row)
            s.flush()
            listing = token_to_json(row, now)
        audit(self.store, actor, "token.create", f"token:{listing['id']}", hostname=hostname,
              expires_at=listing["expires_at"])
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

    def _refuse(self, peer: str, reason: str, hostname: str, **detail: Any) -> AuthError:
        self._audit_refusal(peer, hostname, reason=reason, **detail)
        return AuthError(f"enrollment refused: {reason}",
                         hint="create a fresh token with `fleetctl token create` and pass it to the agent")

    def enroll(self, token: str, hostname: str, csr_pem: bytes, peer: str = "unknown") -> EnrollResult:
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
        with self.store.session() as s:
            row = s.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token)))
            if row is None:
                raise self._refuse(peer, "wrong token", hostname)
            detail = {"token_id": row.id}
            if row.revoked:
                raise self._refuse(peer, "token revoked", hostname, **detail)
            if row.used_at is not None:
                raise self._refuse(peer, "token already used (replayed enrollment)", hostname, **detail)
            if row.expires_at <= now:
                raise self._refuse(peer, "token expired", hostname, **detail)
            if row.hostname and row.hostname != hostname:
                raise self._refuse(peer, f"token is for host {row.hostname}, not {hostname}", hostname, **detail)
            holder = s.scalar(select(Identity).where(Identity.hostname == hostname, Identity.revoked.is_(False)))
            if holder is not None:
                self._audit_refusal(peer, hostname, reason="hostname held by another identity", holder=holder.id,
                                    **detail)
                raise ConflictError(f"enrollment refused: hostname {hostname} is already enrolled "
                                    f"(agent {holder.id[:12]})",
                                    hint=f"if the node was reinstalled, run `fleetctl agent revoke {hostname}` "
                                         "first, then enroll with a new token")
            issued = self.ca.sign_csr(csr_pem, agent_id)
            # consume the token atomically: a concurrent replay loses here
            res = s.execute(update(EnrollmentToken)
                            .where(EnrollmentToken.id == row.id, EnrollmentToken.used_at.is_(None))
                            .values(used_at=now, used_by=agent_id))
            if getattr(res, "rowcount", 1) != 1:
                raise self._refuse(peer, "token already used (replayed enrollment)", hostname, **detail)
            s.add(Identity(id=agent_id, hostname=hostname, cert_serial=issued.serial,
                           cert_fingerprint=issued.fingerprint, created_at=now, revoked=False, token_id=row.id))
        audit(self.store, f"agent:{agent_id}", "enroll", hostname, token_id=detail["token_id"],
              serial=issued.serial)
        return EnrollResult(agent_id, hostname, issued.pem, self.ca.ca_pem)

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
            self._by_id[agent_id] = AgentIdentity(ident.agent_id, ident.hostname, ident.cert_serial, True)

    def refresh(self) -> None:
        with self.store.session() as s:
            revoked = set(s.scalars(select(Identity.id).where(Identity.revoked.is_(True))))
        for agent_id in revoked & self._by_id.keys():
            self.mark_revoked(agent_id)
        self._refreshed = time.monotonic()

    def lookup(self, agent_id: str) -> AgentIdentity | None:
        if not self.refresh_in_background and time.monotonic() - self._refreshed > REFRESH_SECONDS:
            self.refresh()
        ident = self._by_id.get(agent_id)
        if ident is None:
            with self.store.session() as s:
                row = s.get(Identity, agent_id)
                if row is None:
                    return None
                ident = AgentIdentity(row.id, row.hostname, row.cert_serial, row.revoked)
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
        if serial is not None and serial != ident.cert_serial:
            raise AuthError(f"certificate serial {serial} is not the one issued to agent {agent_id}",
                            hint="enroll the agent again with a fresh token")
        return ident

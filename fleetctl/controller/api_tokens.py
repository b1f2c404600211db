"""Per-user API tokens: bearer tokens for the JSON API that stand for one dashboard user and their role.

``fleet-controller user token create NAME [--ttl 30d]`` prints a new token once (``fleetu_`` + 43 characters,
256 random bits); ``list`` and ``revoke`` manage them. The store keeps only the token's sha256 (a random
256-bit secret has no dictionary to try, so a slow password hash such as scrypt would cost every request
~50 ms and protect nothing more), its first characters to name it, and when it was created, expires and was
last used. ``authenticate`` turns a presented token into its user's ``Principal`` — the API's audit actor —
or refuses it (unknown, revoked, expired, or its user disabled or deleted). The admin token (STATE/admin.token)
stays the break-glass credential: actor ``admin``, every right (docs/security.md, "API tokens and the audit
actor").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from fleetctl.controller.audit import audit
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.users import ROLES, ApiToken, User, validate_name
from fleetctl.fleet.errors import AuthError, ForbiddenError, NotFoundError, UsageError

TOKEN_PREFIX = "fleetu_"
PREFIX_CHARS = 14  # shown in listings and accepted by revoke: ``fleetu_`` + 7 random characters
DEFAULT_TTL = dt.timedelta(days=30)
MAX_TTL = dt.timedelta(days=365)
MAX_TOKEN_CHARS = 128
LAST_USED_EVERY = dt.timedelta(seconds=60)  # last_used_at is written at most once a minute per token
#: actors the controller itself writes: a user of that name would be indistinguishable in the audit log
RESERVED_NAMES = ("admin", "engine", "scheduler", "controller")
_RANK = {role: i for i, role in enumerate(ROLES)}


@dataclass(frozen=True)
class Principal:
    """Who authenticated a request: a user through one of their API tokens, or ``admin`` (the admin token)."""

    name: str
    role: str  # metrics | viewer | operator | admin
    token_id: int | None = None  # None: the admin token

    def may(self, role: str) -> bool:
        return _RANK.get(self.role, -1) >= _RANK[role]


ADMIN = Principal("admin", "admin")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_user_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX) and len(token) <= MAX_TOKEN_CHARS


def _state(row: ApiToken, now: dt.datetime) -> str:
    return "revoked" if row.revoked_at else "expired" if row.expires_at <= now else "active"


def token_to_json(row: ApiToken, user: User, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    return {"id": row.id, "user": user.name, "role": user.role, "prefix": row.prefix, "state": _state(row, now),
            "created_at": row.created_at.isoformat(), "expires_at": row.expires_at.isoformat(),
            "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
            "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None}


def create_token(store: Store, name: str, ttl: dt.timedelta = DEFAULT_TTL, *,
                 actor: str = "fleet-controller") -> tuple[str, dict[str, Any]]:
    """A new token for user ``name`` (plaintext, shown once) and its listing entry."""
    validate_name(name)
    if ttl.total_seconds() <= 0 or ttl > MAX_TTL:
        raise UsageError(f"token TTL {ttl} out of range", hint="use a --ttl between 1s and 365d")
    if name in RESERVED_NAMES:
        raise UsageError(f"user {name!r} has a name the controller writes as an audit actor itself",
                         hint=f"add the person under another name (not {', '.join(RESERVED_NAMES)}) and give "
                              f"that user the token; the admin token is already audited as 'admin'")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    with store.session() as s:
        user = s.scalars(select(User).where(User.name == name)).first()
        if user is None:
            raise NotFoundError(f"no user {name!r}",
                                hint="add one with "
                                     "`fleet-controller user add NAME --role metrics|viewer|operator|admin`")
        if user.disabled:
            raise UsageError(f"user {name!r} is disabled",
                             hint="re-enable it with `fleet-controller user add NAME --replace`")
        row = ApiToken(user_id=user.id, token_hash=hash_token(token), prefix=token[:PREFIX_CHARS],
                       created_at=now, expires_at=now + ttl)
        s.add(row)
        s.flush()
        listing = token_to_json(row, user, now)
    audit(store, actor, "api-token.create", f"api-token:{listing['id']}", user=name, role=listing["role"],
          expires_at=listing["expires_at"])
    return token, listing


def list_tokens(store: Store, name: str | None = None) -> list[dict[str, Any]]:
    now = utcnow()
    with store.session() as s:
        q = select(ApiToken, User).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id)
        if name is not None:
            q = q.where(User.name == name)
        return [token_to_json(t, u, now) for t, u in s.execute(q).all()]


def revoke_token(store: Store, ref: str, *, actor: str = "fleet-controller") -> dict[str, Any]:
    """Revoke by id, prefix (as listed) or the token itself; takes effect on the token's next request."""
    with store.session() as s:
        q = select(ApiToken, User).join(User, User.id == ApiToken.user_id)
        if ref.isdigit():
            q = q.where(ApiToken.id == int(ref))
        elif looks_like_user_token(ref) and len(ref) > PREFIX_CHARS:
            q = q.where(ApiToken.token_hash == hash_token(ref))
        else:
            q = q.where(ApiToken.prefix == ref)
        rows = s.execute(q).all()
        if len(rows) != 1:
            raise NotFoundError(f"no single API token matches {ref!r}",
                                hint="give the id shown by `fleet-controller user token list`")
        row, user = rows[0]
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        listing = token_to_json(row, user)
    audit(store, actor, "api-token.revoke", f"api-token:{listing['id']}", user=listing["user"])
    return listing


_REFUSED_HINT = ("create a new one with `fleet-controller user token create NAME` on the controller host and "
                 "pass it as $FLEETCTL_TOKEN or --token-file")


def authenticate(store: Store, token: str) -> Principal:
    """The principal a user token stands for, or ``AuthError`` saying why not (the same message whatever the
    reason an unknown token was refused; revoked and expired tokens say so, they were genuine)."""
    if not looks_like_user_token(token):
        raise AuthError("missing or wrong API token", hint=_REFUSED_HINT)
    now = utcnow()
    with store.session() as s:
        found = s.execute(select(ApiToken, User).join(User, User.id == ApiToken.user_id)
                          .where(ApiToken.token_hash == hash_token(token))).first()
        if found is None:
            raise AuthError("missing or wrong API token", hint=_REFUSED_HINT)
        row, user = found
        if row.revoked_at is not None:
            raise AuthError(f"API token {row.prefix}… of {user.name} was revoked", hint=_REFUSED_HINT)
        if row.expires_at <= now:
            raise AuthError(f"API token {row.prefix}… of {user.name} expired at {row.expires_at.isoformat()}",
                            hint=_REFUSED_HINT)
        if user.disabled:
            raise AuthError(f"user {user.name} is disabled", hint="ask an admin to re-enable the user")
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
            row.last_used_at = now
        return Principal(user.name, user.role, row.id)


def require_role(principal: Principal, role: str, what: str) -> Principal:
    """``principal`` if its role allows ``role``'s actions, else ``ForbiddenError`` (HTTP 403)."""
    if principal.may(role):
        return principal
    raise ForbiddenError(f"user {principal.name} has the {principal.role} role; {what} needs the {role} role",
                         hint=f"use a token of a user with the {role} role, or have an admin run "
                              f"`fleet-controller user add {principal.name} --role {role} --replace`")

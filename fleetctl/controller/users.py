"""Who may act on the controller: the roles, the ``users`` table and users' API tokens (``api_tokens``).

Below the dashboard and the JSON API alike: the dashboard's login (controller/web/auth.py), the API's bearer
tokens (controller/api_tokens.py) and ``fleet-controller user`` all keep their accounts here.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from fleetctl.controller.store.models import Base
from fleetctl.fleet.errors import UsageError

#: each may do what the ones before it may; ``metrics`` may only scrape /metrics (a Prometheus credential
#: that cannot read the API or log in to the dashboard)
ROLES = ("metrics", "viewer", "operator", "admin")
METRICS_ROLE = ROLES[0]


def validate_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_.@" for c in name):
        raise UsageError(f"invalid user name {name!r}", hint="use 1-64 letters, digits, '-', '_', '.' or '@'")
    return name


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}", hint=f"use one of: {', '.join(ROLES)}")
    return role


class User(Base):
    """A dashboard user. ``password_hash`` is ``scrypt$n$r$p$salt_hex$hash_hex``."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(512))
    role: Mapped[str] = mapped_column(String(16))  # metrics | viewer | operator | admin
    created_at: Mapped[dt.datetime]
    last_login_at: Mapped[dt.datetime | None]
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiToken(Base):
    """A user's bearer token for the JSON API (``fleet-controller user token create``; controller/api_tokens.py).

    Only the token's sha256 is stored (it is 256 random bits: no dictionary to try, so a slow hash adds
    nothing), with its first characters (``prefix``) to name it in listings. Migration ``web_0005``."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]

"""ORM models: one ``Base`` for every table of the controller.

Timestamps are timezone-aware UTC (``UtcDateTime`` stores them naive-UTC on SQLite and as
``timestamptz`` on PostgreSQL, and always hands back aware datetimes).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false
from sqlalchemy.types import LargeBinary

from fleetctl.fleet.jobs import JobStatus


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use controller.store.utcnow()")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UtcDateTime, dict[str, Any]: JSON, list[Any]: JSON}


# ---- identity and enrollment -------------------------------------------------------------

class Identity(Base):
    """An enrolled agent: its id (the client certificate's CN) and the hostname bound at enrollment."""

    __tablename__ = "identities"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # agent id, = certificate CN
    hostname: Mapped[str] = mapped_column(String(253), index=True)
    cert_serial: Mapped[str] = mapped_column(String(64))  # hex
    cert_fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 hex of the DER certificate
    created_at: Mapped[dt.datetime]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[dt.datetime | None]
    token_id: Mapped[int | None] = mapped_column(ForeignKey("enrollment_tokens.id"))
    # controller/enrollment.py IdentityState: active | pending (waiting for an operator's approval) | denied
    state: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    csr_pem: Mapped[str | None] = mapped_column(Text)  # pending: signed when an operator approves
    cert_pem: Mapped[str | None] = mapped_column(Text)  # approved: fetched by the agent that waited for it
    pending_hash: Mapped[str | None] = mapped_column(String(64), index=True, unique=True)  # the waiting agent's secret
    source: Mapped[str | None] = mapped_column(String(64))  # the address it enrolled from
    cert_not_after: Mapped[dt.datetime | None]  # None: issued before renewal existed (created_at + a year)
    prev_cert_serial: Mapped[str | None] = mapped_column(String(64))  # replaced by a renewal; valid until it expires


class EnrollmentToken(Base):
    """An enrollment token, one-time by default (``max_uses``); only its sha256 is stored."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to recognise a token in lists
    hostname: Mapped[str | None] = mapped_column(String(253))  # if set, only this hostname may enroll
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]
    used_by: Mapped[str | None] = mapped_column(String(64))  # identity id (the last use)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    max_uses: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # counted by a conditional UPDATE
    hostname_pattern: Mapped[str | None] = mapped_column(String(253))  # glob ('gpu-*') the hostname must match
    source_network: Mapped[str | None] = mapped_column(String(64))  # CIDR the enrolling address must be in
    approval: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # enrollments wait


# ---- registry ----------------------------------------------------------------------------

class Node(Base):
    """A node of the fleet, as last reported by its agent."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hostname: Mapped[str] = mapped_column(String(253), unique=True)
    identity_id: Mapped[str | None] = mapped_column(ForeignKey("identities.id"), index=True)
    # a controller.node_status.NodeStatus; spelled out here because the store sits below that pure core
    status: Mapped[str] = mapped_column(String(16), default="online")
    status_changed_at: Mapped[dt.datetime | None]
    last_seen: Mapped[dt.datetime | None]
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)  # DESIGN §3.1 object
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # probe diagnostics etc.
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[dt.datetime]
    facts_updated_at: Mapped[dt.datetime]
    agent_version: Mapped[str | None] = mapped_column(String(64))  # as last reported with the facts

    identity: Mapped[Identity | None] = relationship(lazy="joined")
    # the user's labels (`fleetctl label`), loaded with every node: selection and every node view show them
    labels: Mapped[list[NodeLabel]] = relationship(lazy="selectin", cascade="all, delete-orphan",
                                                   passive_deletes=True, order_by="NodeLabel.key")


class NodeLabel(Base):
    """A user label on a node (``fleetctl label NODE k=v``): Kubernetes' key and value syntax
    (controller/labels.py); the registry owns them (``Registry.set_labels``, ``labels_of``, ``select``)."""

    __tablename__ = "node_labels"

    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(317), primary_key=True)  # a DNS prefix (≤ 253) "/" a name (≤ 63)
    value: Mapped[str] = mapped_column(String(63))


class FactsHistory(Base):
    """One facts change of a node: which fields changed, old and new values (dotted paths)."""

    __tablename__ = "facts_history"
    __table_args__ = (Index("ix_facts_history_node_at", "node_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime]
    changed: Mapped[list[Any]] = mapped_column(JSON)  # ["driver.version", ...]; ["*"] on first report
    old: Mapped[dict[str, Any]] = mapped_column(JSON)  # {path: old value}
    new: Mapped[dict[str, Any]] = mapped_column(JSON)  # {path: new value}


class NodeEvent(Base):
    """Status transitions of a node (online → offline → online ...)."""

    __tablename__ = "node_events"
    __table_args__ = (Index("ix_node_events_node_at", "node_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime]
    old_status: Mapped[str | None] = mapped_column(String(16))
    new_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")


class AuditLog(Base):
    """Security-relevant actions and refusals (enrollment, revocation, token use)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime]
    actor: Mapped[str] = mapped_column(String(253))  # "admin", "agent:<id>", "peer:<addr>"
    action: Mapped[str] = mapped_column(String(64))  # "enroll", "enroll.refused", "token.create", ...
    target: Mapped[str] = mapped_column(String(253), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


# ---- jobs and artifacts -------------------------------------------------------------------

class Job(Base):
    """A unit of work for one node's agent (a playbook run or a verification)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_node_status", "node", "status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(253))  # hostname
    kind: Mapped[str] = mapped_column(String(64))
    vars: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timeout_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    # pending → dispatched → running → successful | failed | timeout | canceled
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING)
    created_at: Mapped[dt.datetime]
    dispatched_at: Mapped[dt.datetime | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    rc: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class JobEvent(Base):
    """One event of a job (ansible-runner event or ``fleet_*``), in agent order (``counter``)."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_counter", "job_id", "counter", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    counter: Mapped[int] = mapped_column(BigInteger)
    event: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[dt.datetime]


class Artifact(Base):
    """Metadata of a content-addressed file in STATE/artifacts (see controller/artifacts.py)."""

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # wheel | sdist | apt-key | other
    size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[dt.datetime]


class ArtifactProvenance(Base):
    """Who or what put an artifact in the store (controller/artifacts.py ``Provenance``); one row per distinct
    origin, since the same bytes may arrive more than once (fetched from upstream and imported from a bundle).
    Migration ``artifacts_0001``: rows that predate it are ``legacy``."""

    __tablename__ = "artifact_provenance"
    __table_args__ = (Index("ix_artifact_provenance_source_ref", "source", "ref"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # user | upstream | build | bundle | legacy
    ref: Mapped[str] = mapped_column(String(2048), default="")  # actor | URL | build job id | bundle lock sha256
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[dt.datetime]


# ---- shared by every controller of a PostgreSQL database (docs/ha.md, "What is shared") ----------------

class SharedCa(Base):
    """The controllers' CA on PostgreSQL: one row (``id`` 1), created by the first controller to start or migrated
    from its ``STATE/ca/``; its key sealed with the key-encryption key when one is configured
    (controller/shared_ca.py). On SQLite the CA stays in the state dir and this table is empty."""

    __tablename__ = "ca"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: one CA per database
    cert_pem: Mapped[str] = mapped_column(Text)  # the signing CA, then its chain up to the root
    key_data: Mapped[bytes] = mapped_column(LargeBinary)  # PKCS#8 PEM, or its AES-256-GCM sealing
    key_encryption: Mapped[str] = mapped_column(String(16))  # none | aes-256-gcm
    kek_id: Mapped[str] = mapped_column(String(16), default="")  # which key-encryption key sealed it
    origin: Mapped[str] = mapped_column(String(512))  # created | migrated from HOST:DIR | imported …
    created: Mapped[dt.datetime]
    updated: Mapped[dt.datetime]


class AdminToken(Base):
    """The sha256 of each controller's admin token (``STATE/admin.token``) on PostgreSQL: every controller of the
    database accepts each of them (controller/shared_ca.py ``register_admin_token``)."""

    __tablename__ = "admin_tokens"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    controller: Mapped[str] = mapped_column(String(512))  # HOST:STATE_DIR of the controller that made it
    created: Mapped[dt.datetime]


class ArtifactContent(Base):
    """Where an artifact's bytes are on PostgreSQL: a large object (controller/artifacts.py ``LargeObjects``),
    so that every controller can serve it; a controller's ``STATE/artifacts`` is then its cache."""

    __tablename__ = "artifact_content"

    sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256", ondelete="CASCADE"), primary_key=True)
    oid: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[dt.datetime]

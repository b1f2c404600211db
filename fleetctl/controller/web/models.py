"""The table owned by the dashboard: the denormalised ``dashboard_nodes`` index (users: controller/users.py).

``dashboard_nodes`` holds one row per node with the columns the node table filters and sorts
on, copied out of ``nodes.facts`` (and, verbatim, each node's latest verification from
``controller.verify_store.views``) by ``controller.web.nodeindex.sync`` so that a page of
10,000 nodes never parses JSON per row.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from fleetctl.controller.node_status import NOT_ONLINE
from fleetctl.controller.store.models import Base, Job
from fleetctl.fleet.jobs import UNSUCCESSFUL


def rank_of(status: str, verify_result: str, fa_version: str, job_status: str = "") -> int:
    """Node table order: 0 failing (offline, degraded, last verification failed, last install/build job
    failed), 1 attention (no FlashAttention or never verified), 2 fine."""
    if status in NOT_ONLINE or verify_result == "failed" or job_status in UNSUCCESSFUL:
        return 0
    if not fa_version or not verify_result:
        return 1
    return 2


class DashboardNode(Base):
    """Denormalised node row for the node table (kept in step by ``nodeindex.sync``)."""

    __tablename__ = "dashboard_nodes"
    __table_args__ = (
        Index("ix_dashboard_nodes_rank_host", "rank", "hostname"),
        Index("ix_dashboard_nodes_status", "status", "hostname"),
        Index("ix_dashboard_nodes_gpu", "gpu_model", "hostname"),
        Index("ix_dashboard_nodes_fa", "fa_variant", "fa_version"),
        Index("ix_dashboard_nodes_fa_host", "fa_version", "hostname"),
        Index("ix_dashboard_nodes_verify", "verify_result", "rank", "hostname"),
        Index("ix_dashboard_nodes_driver", "driver", "hostname"),
        Index("ix_dashboard_nodes_torch", "torch", "hostname"),
        Index("ix_dashboard_nodes_verify_at", "verify_at", "hostname"),
        Index("ix_dashboard_nodes_cuda_max", "cuda_max", "hostname"),
        Index("ix_dashboard_nodes_nvcc", "nvcc", "hostname"),
        Index("ix_dashboard_nodes_python", "python", "hostname"),
    )

    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(253), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    # 0 = failing (offline, degraded or last verification failed), 1 = attention, 2 = fine
    rank: Mapped[int] = mapped_column(Integer)
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    gpu_model: Mapped[str] = mapped_column(String(128), default="")
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    compute_capability: Mapped[str] = mapped_column(String(8), default="")
    driver: Mapped[str] = mapped_column(String(32), default="")
    cuda_max: Mapped[str] = mapped_column(String(16), default="")
    nvcc: Mapped[str] = mapped_column(String(16), default="")
    torch: Mapped[str] = mapped_column(String(64), default="")
    torch_cuda: Mapped[str] = mapped_column(String(16), default="")
    cxx11abi: Mapped[bool | None] = mapped_column(Boolean)
    python: Mapped[str] = mapped_column(String(32), default="")
    fa_version: Mapped[str] = mapped_column(String(32), default="")
    fa_variant: Mapped[str] = mapped_column(String(32), default="")
    verify_result: Mapped[str] = mapped_column(String(16), default="")  # passed | failed | "" (never)
    verify_at: Mapped[dt.datetime | None]
    verify_tflops: Mapped[float | None] = mapped_column(Float)
    # copies of the source columns, to notice when a row is stale
    # the node's latest finished job other than verify (install, build, keyring, toolkit, rollback)
    job_kind: Mapped[str] = mapped_column(String(64), default="")
    job_status: Mapped[str] = mapped_column(String(16), default="")
    job_at: Mapped[dt.datetime | None]
    src_facts_at: Mapped[dt.datetime | None]
    verify_id: Mapped[int | None] = mapped_column(Integer)  # verifications.id of the copied latest result


# verify jobs are looked up by kind and finish time (``nodeindex.sync``); index on the core's table
Index("ix_jobs_kind_finished", Job.kind, Job.finished_at)
Index("ix_jobs_finished", Job.finished_at)

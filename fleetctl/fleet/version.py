"""This installation's version: the one place the CLI, the controller's API and the agent's reports read it."""

from __future__ import annotations

import enum
import platform
from importlib import metadata

from packaging.version import InvalidVersion, Version

DISTRIBUTION = "fleetctl"


def package_version() -> str:
    """The installed ``fleetctl`` distribution's version; ``unknown`` in a source tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def local_versions() -> dict[str, str]:
    """What ``version`` prints about this process: the package, the Python running it, the platform."""
    return {"version": package_version(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "platform": platform.platform()}


#: The oldest agent a controller of this version works with (every RPC it needs was there). The supported range is
#: from this up to the controller's own version: an agent newer than its controller may expect RPCs the controller
#: lacks, so controllers are upgraded first (docs/deploy.md, "Version skew").
MIN_AGENT_VERSION = "0.1.0"


class AgentSupport(enum.StrEnum):
    """Whether a controller supports an agent's version."""

    SUPPORTED = "supported"
    TOO_OLD = "too-old"
    TOO_NEW = "too-new"
    UNKNOWN = "unknown"  # the agent reported no version (older than nodes_0001) or one that does not parse


def supported_agent_versions(controller: str | None = None) -> str:
    """The range as a specifier: ``>=0.1.0,<=0.2.0`` (no upper bound when the controller's version is unknown)."""
    controller = controller or package_version()
    try:
        return f">={MIN_AGENT_VERSION},<={Version(controller)}"
    except InvalidVersion:
        return f">={MIN_AGENT_VERSION}"


def agent_support(agent: str | None, controller: str | None = None) -> AgentSupport:
    """Where ``agent`` (an agent's reported version) stands against this controller's supported range."""
    try:
        version = Version(agent or "")
    except InvalidVersion:
        return AgentSupport.UNKNOWN
    if version.release < Version(MIN_AGENT_VERSION).release:
        return AgentSupport.TOO_OLD
    try:
        newest = Version(controller or package_version())
    except InvalidVersion:
        return AgentSupport.SUPPORTED
    return AgentSupport.TOO_NEW if version.release > newest.release else AgentSupport.SUPPORTED

"""This installation's version: the one place the CLI, the controller's API and the agent's reports read it."""

from __future__ import annotations

import platform
from importlib import metadata

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

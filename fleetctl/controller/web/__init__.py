"""The web dashboard (issue 7): pages, live updates (SSE), login with roles, /metrics.

``mount(app, ctx)`` adds it to the controller's FastAPI app; see docs/dashboard.md.
"""

from __future__ import annotations

from fleetctl.controller.web.app import close, create_standalone_app, mount, router

__all__ = ["close", "create_standalone_app", "mount", "router"]

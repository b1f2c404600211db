"""What every HTTP route of the controller depends on: the controller's parts and who is calling.

A leaf: the JSON API (controller/api.py) and the sub-routers (artifacts, rollouts, verification, attention)
import these; nothing here imports a router. Routes reach the controller through ``Ctx`` (the
``ControllerContext`` the composition root, controller/app.py, built) and protect themselves with ``Viewer``
(reads), ``Operator`` (steering rollouts, verification) or ``Admin`` (everything else), which refuse a lesser
role with 403.

The bearer token is a user's API token (``fleet-controller user token create``, controller/api_tokens.py) or
the admin token (STATE/admin.token, the break-glass credential); ``authenticate`` turns it into a
``Principal``, the audit actor of whatever the request does.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from fleetctl.controller.api_tokens import ADMIN, Principal, looks_like_user_token, require_role
from fleetctl.controller.api_tokens import authenticate as authenticate_user_token
from fleetctl.controller.context import ControllerContext
from fleetctl.fleet.errors import AuthError

API_PREFIX = "/api/v1"


def get_ctx(request: Request) -> ControllerContext:
    ctx: ControllerContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ControllerContext, Depends(get_ctx)]


_TOKEN_HINT = ("pass a user's API token (`fleet-controller user token create NAME`) as $FLEETCTL_TOKEN or "
               "--token-file, or the admin token: fleetctl reads STATE/admin.token with --state-dir")


def authenticate(ctx: Ctx, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """Dependency: who the bearer token stands for — ``admin`` for STATE/admin.token, else the user whose API
    token it is (a sync dependency: FastAPI runs it, with its database lookup, off the event loop)."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing bearer token", hint=_TOKEN_HINT)
    if ctx.is_admin_token(token):
        return ADMIN
    if not looks_like_user_token(token):
        raise AuthError("wrong bearer token: neither the admin token nor a user's API token", hint=_TOKEN_HINT)
    return authenticate_user_token(ctx.store, token)


Authenticated = Annotated[Principal, Depends(authenticate)]


def require_viewer(principal: Authenticated) -> Principal:
    """Dependency: any authenticated principal (reads)."""
    return require_role(principal, "viewer", "reading")


def require_operator(principal: Authenticated, request: Request) -> Principal:
    """Dependency: an operator or admin (steering rollouts, verification runs and schedules)."""
    return require_role(principal, "operator", f"{request.method} {request.url.path}")


def require_admin(principal: Authenticated, request: Request) -> Principal:
    """Dependency: an admin user's token or the admin token (enrollment, node revocation, artifacts)."""
    return require_role(principal, "admin", f"{request.method} {request.url.path}")


Viewer = Annotated[Principal, Depends(require_viewer)]
Operator = Annotated[Principal, Depends(require_operator)]
Admin = Annotated[Principal, Depends(require_admin)]

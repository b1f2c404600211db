"""fleetctl's HTTP client for the controller's JSON API (``/api/v1``, bearer admin token).

Finding the controller (docs/architecture.md): ``--controller URL``, else
``$FLEETCTL_CONTROLLER``, else ``--state-dir``/``$FLEETCTL_STATE_DIR`` (default
``./state/controller``) → ``controller.json`` (its ``http``) + ``admin.token``. The bearer token comes
from ``--token-file FILE``, else ``$FLEETCTL_TOKEN``, else ``$FLEETCTL_TOKEN_FILE``, else the state dir's
``admin.token`` (the break-glass credential); a user's API token (``fleet-controller user token create``)
makes the controller audit that user as the actor. Connection failures become
``ControllerUnavailable``; the API's JSON errors become the matching ``FleetError``.

Commands add the options with ``add_controller_args(parser)`` and build a client with
``ControllerClient.from_args(args)``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import httpx

from fleetctl.controller.signatures import SignatureError
from fleetctl.fleet.errors import (
    AuthError,
    ConflictError,
    ControllerUnavailable,
    FactsError,
    FleetError,
    ForbiddenError,
    InputError,
    NotFoundError,
    StaleFactsError,
    StoreError,
    UpstreamError,
    UsageError,
)
from fleetctl.fleet.statedir import DEFAULT_STATE_DIR

_ERRORS: dict[str, type[FleetError]] = {
    "auth": AuthError, "not-found": NotFoundError, "conflict": ConflictError, "bad-input": InputError,
    "bad-facts": InputError, "usage": UsageError, "store": StoreError, "controller-unavailable": ControllerUnavailable,
    "stale-facts": StaleFactsError, "upstream": UpstreamError, "bad-signature": SignatureError,
    "forbidden": ForbiddenError,
}
_START_HINT = ("start it with `fleet-controller serve --state-dir DIR` (or `fleet-controller fleet up`), "
               "or point fleetctl at it with --controller URL / --state-dir DIR")


def add_controller_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", metavar="URL", help="controller HTTP URL (default: $FLEETCTL_CONTROLLER, "
                        "else STATE/controller.json)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="controller state dir (default: $FLEETCTL_STATE_DIR or ./state/controller)")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="file holding the API token (default: $FLEETCTL_TOKEN, $FLEETCTL_TOKEN_FILE, "
                             "else STATE/admin.token)")


def add_label_selector_arg(parser: argparse.ArgumentParser) -> None:
    """``-l/--selector LABELS`` of every command that takes nodes: a label selector (controller/labels.py), sent to
    the controller, which applies it (AND-ed with ``--nodes`` where the command has that)."""
    parser.add_argument("-l", "--selector", dest="labels", metavar="LABELS",
                        help="label selector: k=v, k!=v, 'k in (a,b)', 'k notin (a)', k, !k; comma = AND "
                             "(see `fleetctl label`)")


class ControllerClient:
    def __init__(self, base_url: str, token: str | None, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"} if token else {})

    @classmethod
    def discover(cls, controller: str | None = None, state_dir: Path | None = None,
                 token_file: Path | None = None, *, token_required: bool = True) -> ControllerClient:
        url = controller or os.environ.get("FLEETCTL_CONTROLLER")
        state = state_dir or Path(os.environ.get("FLEETCTL_STATE_DIR") or DEFAULT_STATE_DIR)
        env_file = os.environ.get("FLEETCTL_TOKEN_FILE")
        token = None if token_file else os.environ.get("FLEETCTL_TOKEN")
        chosen = token_file or (Path(env_file) if token is None and env_file else None)
        if chosen is not None:
            try:
                token = chosen.read_text().strip()
            except OSError as exc:
                raise AuthError(f"cannot read the token file {chosen}: {exc.strerror or exc}",
                                hint="give a readable file holding the token from "
                                     "`fleet-controller user token create NAME`") from exc
            if not token:
                raise AuthError(f"the token file {chosen} is empty",
                                hint="put the token from `fleet-controller user token create NAME` in it")
        if token is None:
            try:
                token = (state / "admin.token").read_text().strip()
            except OSError:
                token = None
        if url is None:
            try:
                url = json.loads((state / "controller.json").read_text())["http"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ControllerUnavailable(f"no controller found: cannot read {state / 'controller.json'}",
                                            hint=_START_HINT) from exc
        if not url:
            raise ControllerUnavailable("controller.json has no http address", hint=_START_HINT)
        if token is None and token_required:
            raise AuthError(f"no admin token: cannot read {state / 'admin.token'}",
                            hint="pass --state-dir of the controller or set FLEETCTL_TOKEN")
        return cls(url, token)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, token_required: bool = True) -> ControllerClient:
        """``token_required=False`` for routes open to anyone (``/live``): a token is sent only when one is known."""
        return cls.discover(getattr(args, "controller", None), getattr(args, "state_dir", None),
                            getattr(args, "token_file", None), token_required=token_required)

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self._http.request(method, f"/api/v1{path}", params=params, json=body)
        except httpx.TimeoutException as exc:
            raise ControllerUnavailable(f"controller at {self.base_url} did not answer in time",
                                        hint="check that it is running and not overloaded") from exc
        except httpx.HTTPError as exc:
            raise ControllerUnavailable(f"cannot reach the controller at {self.base_url}: {exc}",
                                        hint=_START_HINT) from exc
        return self.decode(resp, path)

    @staticmethod
    def decode(resp: httpx.Response, what: str) -> Any:
        """The response's JSON, or the controller's error (``{"error": {code, message, hint}}``) raised."""
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                cls = _ERRORS.get(str(err.get("code")), FleetError)
                if cls is FactsError:
                    cls = InputError
                raise cls(str(err.get("message")), hint=err.get("hint"))
            if resp.status_code == 422 and isinstance(data, dict):
                raise InputError(f"request refused: {data.get('detail')}", hint="check the arguments")
            raise FleetError(f"controller answered HTTP {resp.status_code} for {what}",
                             hint="see the controller's log")
        return data

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body=body or {})

    def close(self) -> None:
        self._http.close()

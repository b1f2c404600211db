"""fleetctl's HTTP client for the controller's JSON API (``/api/v1``, bearer admin token).

Finding the controller (docs/architecture.md): ``--controller URL``, else
``$FLEETCTL_CONTROLLER``, else the context's ``server`` (``--context NAME``/``$FLEETCTL_CONTEXT``, else the config
file's current context, controller/contexts.py; not used when ``--state-dir``/``$FLEETCTL_STATE_DIR`` names a
controller and no context is named), else ``--state-dir``/``$FLEETCTL_STATE_DIR`` (default
``./state/controller``) → ``controller.json`` (its ``http``, and ``http_ca``: the CA its HTTPS certificate chains
to) + ``admin.token``. The server's certificate is verified against ``--ca FILE``, else ``$FLEETCTL_CA``, else that
``http_ca``, else the system's trust store (docs/security.md, "HTTPS"). The bearer token comes
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
import ssl
from pathlib import Path
from typing import Any, TypeVar

import httpx

from fleetctl.controller import contexts
from fleetctl.controller.labels import parse_label_selector
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
class TlsVerifyError(AuthError):
    """The controller's HTTPS certificate is not one the client may trust (wrong CA, wrong name, expired)."""

    code = "tls-verify"


_CA_HINT = ("pass --ca FILE with the CA the controller's certificate chains to: its STATE/ca/ca.pem (copy it from the "
            "controller host, checking its fingerprint: openssl x509 -noout -fingerprint -sha256 -in ca.pem), or the "
            "CA of its --http-cert; or set it once with `fleetctl config set-context NAME --ca FILE`")
_START_HINT = ("start it with `fleet-controller serve --state-dir DIR` (or `fleet-controller fleet up`), "
               "or point fleetctl at it with --controller URL / --state-dir DIR")


def add_controller_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", metavar="NAME",
                        help="a context of fleetctl's config file: its server, token file and CA (default: "
                             "$FLEETCTL_CONTEXT, else the current context; `fleetctl config get-contexts`)")
    parser.add_argument("--controller", metavar="URL", help="controller HTTP URL (default: $FLEETCTL_CONTROLLER, "
                        "else STATE/controller.json)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="controller state dir (default: $FLEETCTL_STATE_DIR or ./state/controller)")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="file holding the API token (default: $FLEETCTL_TOKEN, $FLEETCTL_TOKEN_FILE, "
                             "else STATE/admin.token)")
    parser.add_argument("--ca", type=Path, metavar="FILE",
                        help="CA certificate the controller's HTTPS certificate must chain to (default: $FLEETCTL_CA, "
                             "else STATE/ca/ca.pem for a controller found through its state dir, else the system's)")


def add_label_selector_arg(parser: argparse.ArgumentParser) -> None:
    """``-l/--selector LABELS`` of every command that takes nodes: a label selector (controller/labels.py), sent to
    the controller, which applies it (AND-ed with ``--nodes`` where the command has that)."""
    parser.add_argument("-l", "--selector", dest="labels", metavar="LABELS", type=_label_selector,
                        help="label selector: k=v, k!=v, 'k in (a,b)', 'k notin (a)', k, !k; comma = AND "
                             "(see `fleetctl label`)")


def _label_selector(text: str) -> str:
    """A ``-l`` value, checked by the one parser before anything is sent (a ``UsageError`` naming the term, also
    without a controller); it travels as typed, and the controller parses it again."""
    parse_label_selector(text)
    return text


class ControllerClient:
    def __init__(self, base_url: str, token: str | None, *, timeout: float = 10.0, ca: Path | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.ca = ca
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, verify=_verify(ca),
                                  headers={"Authorization": f"Bearer {token}"} if token else {})

    @classmethod
    def discover(cls, controller: str | None = None, state_dir: Path | None = None,
                 token_file: Path | None = None, *, token_required: bool = True,
                 ca: Path | None = None, context: str | None = None) -> ControllerClient:
        """Each of URL, token and CA from its flag, else its environment variable, else the context (the state dir
        for a local controller last)."""
        named = context or os.environ.get(contexts.CONTEXT_ENV) or None
        local = state_dir is not None or bool(os.environ.get("FLEETCTL_STATE_DIR"))
        ctx = (contexts.load(contexts.config_path(os.environ)).context(named)
               if named or not local else None)
        url = controller or os.environ.get("FLEETCTL_CONTROLLER") or (ctx.server if ctx else None)
        ca = ca or (Path(os.environ["FLEETCTL_CA"]) if os.environ.get("FLEETCTL_CA") else None) or (
            ctx.ca if ctx else None)
        state = state_dir or Path(os.environ.get("FLEETCTL_STATE_DIR") or DEFAULT_STATE_DIR)
        env_file = os.environ.get("FLEETCTL_TOKEN_FILE")
        token = None if token_file else os.environ.get("FLEETCTL_TOKEN")
        chosen = token_file or (Path(env_file) if token is None and env_file else None)
        if chosen is None and token is None and ctx is not None and ctx.token_file is not None:
            contexts.check_token_file(ctx.token_file)  # 0600, like an ssh key
            chosen = ctx.token_file
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
                discovery = json.loads((state / "controller.json").read_text())
                url = discovery["http"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ControllerUnavailable(f"no controller found: cannot read {state / 'controller.json'}",
                                            hint=_START_HINT) from exc
            http_ca = discovery.get("http_ca")  # the controller's own CA issued its HTTPS certificate
            if ca is None and isinstance(http_ca, str) and http_ca:
                ca = state / http_ca
        elif ca is None:  # a URL given for a controller whose state dir is here too: its CA, as if found there
            ca = _local_http_ca(state, url)
        if not url:
            raise ControllerUnavailable("controller.json has no http address", hint=_START_HINT)
        if token is None and token_required:
            raise AuthError(f"no admin token: cannot read {state / 'admin.token'}",
                            hint="pass --state-dir of the controller or set FLEETCTL_TOKEN")
        return cls(url, token, ca=ca)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, token_required: bool = True) -> ControllerClient:
        """``token_required=False`` for routes open to anyone (``/live``): a token is sent only when one is known."""
        return cls.discover(getattr(args, "controller", None), getattr(args, "state_dir", None),
                            getattr(args, "token_file", None), token_required=token_required,
                            ca=getattr(args, "ca", None), context=getattr(args, "context", None))

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self._http.request(method, f"/api/v1{path}", params=params, json=body)
        except httpx.TimeoutException as exc:
            raise ControllerUnavailable(f"controller at {self.base_url} did not answer in time",
                                        hint="check that it is running and not overloaded") from exc
        except httpx.HTTPError as exc:
            raise self.transport_error(exc) from exc
        return self.decode(resp, path)

    def transport_error(self, exc: httpx.HTTPError) -> FleetError:
        """What a failed connection means, said so: a certificate the CA does not vouch for, HTTP spoken to an
        HTTPS controller or the other way round, or no controller there."""
        verify = _ssl_cause(exc, ssl.SSLCertVerificationError)
        if verify is not None:
            trusted = f"the CA in {self.ca}" if self.ca else "the system's trust store"
            return TlsVerifyError(f"the controller at {self.base_url} presented a certificate that {trusted} does "
                                  f"not vouch for: {verify.verify_message or verify.reason or verify}",
                                  hint=_CA_HINT if "hostname" not in str(verify).lower() else
                                  "the certificate does not name the host in the URL: use a name it carries, or "
                                  "restart the controller with --san NAME (or a --http-cert for that name)")
        if self.base_url.startswith("https://") and _ssl_cause(exc, ssl.SSLError) is not None:
            return ControllerUnavailable(f"the controller at {self.base_url} does not speak HTTPS: {exc}",
                                         hint=f"it serves plain HTTP (--http-insecure): use "
                                              f"{self.base_url.replace('https://', 'http://', 1)}")
        if self.base_url.startswith("http://") and isinstance(exc, httpx.RemoteProtocolError):
            return ControllerUnavailable(f"the controller at {self.base_url} closed the connection without answering",
                                         hint=f"controllers serve HTTPS unless started with --http-insecure: use "
                                              f"{self.base_url.replace('http://', 'https://', 1)}")
        return ControllerUnavailable(f"cannot reach the controller at {self.base_url}: {exc}", hint=_START_HINT)

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

    def download(self, path: str, dest: Path) -> Path:
        """A file the controller serves (``/artifacts/SHA/content``), streamed to ``dest``."""
        try:
            with self._http.stream("GET", f"/api/v1{path}") as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self.decode(resp, path)  # raises the controller's error
                with dest.open("wb") as out:
                    for chunk in resp.iter_bytes():
                        out.write(chunk)
        except httpx.HTTPError as exc:
            raise ControllerUnavailable(f"downloading {path} from {self.base_url} failed: {exc}",
                                        hint="check that the controller is running and run the command again") \
                from exc
        return dest

    def close(self) -> None:
        self._http.close()


_E = TypeVar("_E", bound=BaseException)


def _local_http_ca(state: Path, url: str) -> Path | None:
    """The ``http_ca`` of ``STATE/controller.json`` when that controller is the one at ``url``, else None."""
    try:
        discovery = json.loads((state / "controller.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(discovery, dict) or str(discovery.get("http", "")).rstrip("/") != url.rstrip("/"):
        return None
    http_ca = discovery.get("http_ca")
    return state / http_ca if isinstance(http_ca, str) and http_ca else None


def _verify(ca: Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify``: a context trusting only ``ca``, else the system's trust store."""
    if ca is None:
        return True
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use {ca} as the controller's CA: {getattr(exc, 'strerror', None) or exc}",
                         hint="give a readable PEM CA certificate (the controller's STATE/ca/ca.pem)") from exc
    # the file is the trust anchor even when it holds an intermediate (a controller with a bring-your-own
    # intermediate CA): the chain need not reach a self-signed root the client never saw
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _ssl_cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """The ``kind`` error behind an httpx error (httpx wraps the ssl module's errors), if any."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None

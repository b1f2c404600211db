"""fleetctl contexts: named controllers and their credentials, kubeconfig-style (``~/.config/fleetctl/config.toml``).

The file (``$FLEETCTL_CONFIG`` names another) holds::

    current-context = "prod"

    [contexts.prod]
    server = "https://controller.example.com:7480"
    token-file = "/home/me/.config/fleetctl/prod.token"   # mode 0600, or it is refused
    ca = "/home/me/.config/fleetctl/prod-ca.pem"          # the controller's CA (its STATE/ca/ca.pem)

A context is only the last word: a flag (``--controller``, ``--token-file``, ``--ca``, ``--state-dir``) wins over
its environment variable (``FLEETCTL_CONTROLLER``, ``FLEETCTL_TOKEN``/``FLEETCTL_TOKEN_FILE``, ``FLEETCTL_CA``,
``FLEETCTL_STATE_DIR``), which wins over the context (controller/client.py applies the order). ``--context NAME``
(or ``$FLEETCTL_CONTEXT``) picks a context other than the current one. Nothing here talks to a controller.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.fleet.errors import AuthError, NotFoundError, UsageError

CONFIG_ENV = "FLEETCTL_CONFIG"
CONTEXT_ENV = "FLEETCTL_CONTEXT"
_KEYS = ("server", "token-file", "ca")


def config_path(environ: Mapping[str, str]) -> Path:
    """``$FLEETCTL_CONFIG``, else ``$XDG_CONFIG_HOME/fleetctl/config.toml`` (``~/.config`` by default)."""
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]).expanduser()
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "fleetctl" / "config.toml"


@dataclass(frozen=True)
class Context:
    name: str
    server: str | None = None
    token_file: Path | None = None
    ca: Path | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"name": self.name, "server": self.server,
                "token_file": str(self.token_file) if self.token_file else None,
                "ca": str(self.ca) if self.ca else None}


@dataclass(frozen=True)
class ClientConfig:
    path: Path
    current: str | None = None
    contexts: Mapping[str, Context] = field(default_factory=dict)

    def context(self, name: str | None) -> Context | None:
        """The context called ``name`` (None: the current one; None when there is none)."""
        chosen = name or self.current
        if chosen is None:
            return None
        found = self.contexts.get(chosen)
        if found is None:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise NotFoundError(f"no context {chosen!r} in {self.path}",
                                hint=f"known contexts: {known}; create it with `fleetctl config set-context "
                                     f"{chosen} --server URL --token-file FILE --ca FILE`")
        return found


def _path_of(value: object, where: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where} must be a non-empty string (a path)", hint="fix the config file")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def load(path: Path) -> ClientConfig:
    """The config file at ``path``; an absent file is an empty config. Relative paths are relative to the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ClientConfig(path)
    except OSError as exc:
        raise UsageError(f"cannot read fleetctl's config file {path}: {exc.strerror or exc}",
                         hint=f"make it readable, or point ${CONFIG_ENV} at another file") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"fleetctl's config file {path} is not valid TOML: {exc}",
                         hint="fix it, or recreate it with `fleetctl config set-context`") from None
    current = table.get("current-context")
    if current is not None and not isinstance(current, str):
        raise UsageError(f"{path}: current-context must be a string", hint="e.g. current-context = \"prod\"")
    raw = table.get("contexts", {})
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: contexts must be a table", hint="write [contexts.NAME] sections")
    contexts: dict[str, Context] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise UsageError(f"{path}: contexts.{name} must be a table", hint=f"write [contexts.{name}]")
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise UsageError(f"{path}: contexts.{name} has unknown key {unknown[0]!r}",
                             hint=f"a context takes {', '.join(_KEYS)}")
        server = entry.get("server")
        if server is not None and not (isinstance(server, str) and server.startswith(("http://", "https://"))):
            raise UsageError(f"{path}: contexts.{name}.server must be an http(s) URL",
                             hint="e.g. server = \"https://controller.example.com:7480\"")
        contexts[name] = Context(
            name, server,
            _path_of(entry["token-file"], f"{path}: contexts.{name}.token-file", path.parent)
            if "token-file" in entry else None,
            _path_of(entry["ca"], f"{path}: contexts.{name}.ca", path.parent) if "ca" in entry else None)
    return ClientConfig(path, current, contexts)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string of printable text is a TOML basic string


def dump(config: ClientConfig) -> str:
    lines = ["# fleetctl contexts (docs/cli.md, \"Contexts\"); edit with `fleetctl config set-context`", ""]
    if config.current is not None:
        lines += [f"current-context = {_toml_string(config.current)}", ""]
    for ctx in config.contexts.values():
        lines.append(f"[contexts.{_toml_string(ctx.name)}]")
        for key, value in (("server", ctx.server), ("token-file", ctx.token_file), ("ca", ctx.ca)):
            if value is not None:
                lines.append(f"{key} = {_toml_string(str(value))}")
        lines.append("")
    return "\n".join(lines)


def save(config: ClientConfig) -> None:
    """Write the file atomically, 0600 (it names credentials), creating its directory 0700."""
    config.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = config.path.with_name(config.path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(dump(config))
    tmp.replace(config.path)


def check_token_file(path: Path) -> None:
    """A token file must be a regular file only its owner can read (0600 or stricter), like ssh's keys."""
    try:
        st = path.stat()
    except OSError as exc:
        raise AuthError(f"cannot read the token file {path}: {exc.strerror or exc}",
                        hint="give a readable file holding the token from `fleet-controller user token create NAME`"
                        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise AuthError(f"the token file {path} is not a regular file", hint="point token-file at the token itself")
    loose = stat.S_IMODE(st.st_mode) & 0o077
    if loose:
        raise AuthError(f"the token file {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o})",
                        hint=f"chmod 600 {path}")

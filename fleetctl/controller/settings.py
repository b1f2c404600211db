"""Every knob of the controller in one typed, frozen object, read once at start-up.

``ControllerSettings`` is what the composition root (controller/app.py) builds the controller from; no part
reads flags or the environment itself. ``fleet-controller serve`` declares its flags with
``add_arguments(parser)`` and turns them, with the environment, into settings with ``settings_from(args,
environ)``: a flag given on the command line wins over its environment variable, which wins over the default
(docs/architecture.md, "Controller assembly and settings", lists them). A value that does not parse stops the
start with a ``UsageError`` naming the knob and what to set instead.

Every knob can also come from a TOML config file (``--config FILE`` or ``$FLEET_CONFIG``; no file is read
unless one is named): a flag wins over its environment variable, which wins over the file, which wins over the
default. ``FILE_KEYS`` is the one list of the file's keys (each the ``dest`` of its flag);
``config_example()`` prints it as a commented file (``fleet-controller config example``), so the documented
keys and the read ones cannot drift apart. docs/deploy.md describes the file.
"""

from __future__ import annotations

import argparse
import difflib
import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fleetctl.controller.cleanup import CleanupPolicy
from fleetctl.controller.ratelimit import ENROLL_OVERALL, ENROLL_PER_SOURCE, Rate
from fleetctl.controller.registry import DEFAULT_INTERVAL, DEFAULT_MISSED
from fleetctl.controller.rollout.core import check_webhook_url
from fleetctl.controller.store.db import DbTimeouts
from fleetctl.controller.upstream import DEFAULT_INDEX_URL, UpstreamConfig
from fleetctl.controller.verification import RegressionPolicy
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.statedir import DEFAULT_STATE_DIR

T = TypeVar("T")


@dataclass(frozen=True)
class ControllerSettings:
    state_dir: Path = DEFAULT_STATE_DIR
    db_url: str | None = None  # default sqlite:///STATE/controller.db
    grpc_listen: str = "127.0.0.1:7443"  # mutual TLS: every RPC but Enroll
    enroll_listen: str | None = None  # server TLS only, for Enroll; default: grpc port + 1
    http_listen: str = "127.0.0.1:7480"
    # the HTTP API and dashboard serve HTTPS: with http_cert/http_key when given, else with a certificate from the
    # controller's CA (STATE/ca/server.pem); plain HTTP only with http_insecure (docs/security.md, "HTTPS")
    http_cert: Path | None = None
    http_key: Path | None = None
    http_insecure: bool = False
    heartbeat_interval: float = DEFAULT_INTERVAL
    missed_heartbeats: int = DEFAULT_MISSED
    flush_interval: float = 2.0  # how often heartbeat last_seen batches are written
    extra_names: tuple[str, ...] = ()  # more SANs for the server certificate
    artifact_max_bytes: int | None = None
    # upload temp files (partial uploads agents may still continue) older than this are removed at start;
    # agents give up retrying an upload long before (agent/client.py UPLOAD_RETRY_SECONDS)
    upload_stale_seconds: float = 24 * 3600
    # enrollment attempts admitted per source address and overall (controller/ratelimit.py; --enroll-rate)
    enroll_per_source: Rate = ENROLL_PER_SOURCE
    enroll_overall: Rate = ENROLL_OVERALL
    # every enrollment waits for `fleetctl agents approve HOST`, whatever its token says (--enroll-approval)
    enroll_approval: bool = False
    # agents' client certificates last this long; agents renew them when a third is left (--agent-cert-lifetime)
    agent_cert_lifetime: float = 365 * 86400.0
    # freeze start-up objects out of the garbage collector's reach and raise its gen-0 threshold
    # (process-wide: on for `fleet-controller serve`, off for controllers embedded in tests)
    gc_tuning: bool = False
    # where artifacts a plan needs come from when the store lacks them (controller/upstream.py)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # operator keys that may sign `fleetctl artifact add --sig` uploads (controller/signatures.py;
    # --trusted-keyring); require_signed refuses unsigned operator uploads (--require-signed)
    trusted_keyring: Path | None = None
    require_signed: bool = False
    # on PostgreSQL, the CA key in the database is sealed with the key in this file (32 random bytes, base64; the
    # same file on every controller); None: stored as is (controller/shared_ca.py, docs/security.md)
    ca_kek_file: Path | None = None
    # publish each verified node's fleetctl.io/* labels to its Kubernetes node (controller/kubernetes_labels.py):
    # "in-cluster" (the controller's pod's service account) or a kubeconfig path; None: no labels
    kubernetes_labels: str | None = None
    # each ended rollout as an OpenTelemetry trace, sent over OTLP/HTTP to this collector (controller/rollout_traces.py;
    # needs the [otel] extra); None: no tracing, the SDK is never imported
    otel_endpoint: str | None = None
    # a rollout engine holds its rollout's lease this long without renewing it before another controller's
    # engine may take the rollout over (docs/rollout.md; FLEET_ROLLOUT_LEASE_TTL)
    rollout_lease_ttl: float = 15.0
    # this controller runs due verification schedules (FLEET_SCHEDULER=off: another controller does)
    scheduler: bool = True
    scheduler_tick: float = 5.0  # how often the scheduler looks for due runs (FLEET_SCHEDULER_TICK)
    # a relevant facts change is re-verified this long after the last change (FLEET_DRIFT_DEBOUNCE): an
    # upgrade reports several changes within seconds, and one verification covers them all
    drift_debounce: float = 10.0
    dashboard_session_seconds: int = 8 * 3600  # a dashboard login lasts this long (FLEET_DASHBOARD_SESSION_SECONDS)
    # ... and ends sooner when unused this long (FLEET_DASHBOARD_SESSION_IDLE_SECONDS; controller/dashboard_sessions.py)
    dashboard_session_idle_seconds: int = 3600
    # how long a statement may wait for a lock / run (FLEET_DB_LOCK_TIMEOUT_MS, FLEET_DB_STATEMENT_TIMEOUT_MS)
    db_timeouts: DbTimeouts = field(default_factory=DbTimeouts)
    log_level: str = "INFO"  # FLEET_LOG_LEVEL
    # a passing verification this far below its GPU model's fleet median (FLEET_VERIFY_REGRESSION_THRESHOLD), on
    # shapes that at least this many other nodes measured (FLEET_VERIFY_REGRESSION_MIN_SAMPLES), is a regression
    regression: RegressionPolicy = field(default_factory=RegressionPolicy)
    # webhooks told about every rollout's pause, approval wait, failure and completion (docs/rollout.md,
    # "Notifications"), besides each rollout's own --notify-webhook
    notify_webhooks: tuple[str, ...] = ()
    # what the cleanup duty removes from the database, and how often (controller/cleanup.py; docs/operations.md)
    cleanup: CleanupPolicy = field(default_factory=CleanupPolicy)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.state_dir / 'controller.db').resolve()}"


# ---- reading: flags, then the environment, then the default ---------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``fleet-controller serve``. Every flag defaults to None here, so that ``settings_from`` can
    tell "not given" (the environment, the config file or the default decides) from "given"."""
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"TOML config file with any of the settings below (${CONFIG_ENV}; default: none; "
                        "`fleet-controller config example` prints every key with its default)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="state directory (default ./state/controller)")
    p.add_argument("--db", metavar="URL", help="database URL (default sqlite:///STATE/controller.db; "
                   "postgresql+psycopg://user@host/db for PostgreSQL)")
    p.add_argument("--grpc-listen", metavar="HOST:PORT",
                   help="agent port, mutual TLS (default 127.0.0.1:7443)")
    p.add_argument("--enroll-listen", metavar="HOST:PORT", help="enrollment port (default: agent port + 1)")
    p.add_argument("--http-listen", metavar="HOST:PORT",
                   help="HTTP API and dashboard (default 127.0.0.1:7480), HTTPS unless --http-insecure")
    p.add_argument("--http-cert", type=Path, metavar="FILE",
                   help="PEM certificate (chain) the HTTPS API and dashboard present (default: one issued by the "
                        "controller's CA, STATE/ca/server.pem, which clients verify with STATE/ca/ca.pem); "
                        "needs --http-key")
    p.add_argument("--http-key", type=Path, metavar="FILE", help="the PEM private key of --http-cert")
    p.add_argument("--http-insecure", action="store_true", default=None,
                   help="serve the API and dashboard over PLAIN HTTP: tokens and passwords cross the network in "
                        "clear (only for loopback or behind a TLS proxy; logged as a warning at every start)")
    p.add_argument("--heartbeat-interval", type=float, metavar="S",
                   help=f"heartbeat interval asked of agents (default {DEFAULT_INTERVAL:g} s)")
    p.add_argument("--missed-heartbeats", type=int, metavar="N",
                   help=f"a node missing N intervals turns offline (default {DEFAULT_MISSED})")
    p.add_argument("--san", action="append", metavar="NAME",
                   help="another DNS name or IP for the server certificate (repeatable)")
    p.add_argument("--no-gc-tuning", dest="gc_tuning", action="store_false", default=None,
                   help="keep CPython's default garbage collector settings (by default objects alive after "
                        "start-up and registration bursts are frozen and the gen-0 threshold is raised)")
    p.add_argument("--upstream-index", metavar="URL",
                   help="PEP 503 package index for sdists, flash-attn-4 and dependency wheels (default "
                        f"{DEFAULT_INDEX_URL}; a local mirror such as devpi or Artifactory works; 'none': no index)")
    p.add_argument("--wheel-mirror", metavar="URL",
                   help="fetch flash-attn release wheels from here, not GitHub (URL/vVERSION/FILE, then URL/FILE)")
    p.add_argument("--offline", action="store_true", default=None,
                   help="never fetch: plans use only the artifact store (fill it with `fleetctl bundle import`)")
    p.add_argument("--enroll-rate", type=float, metavar="PER_S",
                   help="enrollment attempts allowed per second overall (default 50, burst 200; per source "
                        "address 1/s, burst 20); a lab load test enrolling thousands of agents from one host "
                        "raises it (see docs/security.md, Abuse limits)")
    p.add_argument("--enroll-approval", action="store_true", default=None,
                   help="every enrollment waits for an operator (`fleetctl agents pending|approve|deny`), not "
                        "only those with a token created with --approval")
    p.add_argument("--agent-cert-lifetime", type=float, metavar="S",
                   help="lifetime of agents' client certificates in seconds (default 31536000, a year; at least "
                        f"{MIN_AGENT_CERT_LIFETIME:g}); agents renew theirs when a third of it is left")
    p.add_argument("--trusted-keyring", type=Path, metavar="FILE",
                   help="OpenPGP public keys of the operators (gpg --export --armor KEYID... > FILE): a signature "
                        "sent with `fleetctl artifact add --sig` must come from one of them, else the upload is "
                        "refused; the signer's fingerprint is recorded (docs/security.md, Artifacts and provenance)")
    p.add_argument("--ca-kek-file", metavar="FILE",
                   help="on PostgreSQL, seal the CA key kept in the database with the key in FILE (32 random bytes, "
                        "base64: openssl rand -base64 32; the same file on every controller; FLEET_CA_KEK_FILE)")
    p.add_argument("--require-signed", action="store_true", default=None,
                   help="refuse `fleetctl artifact add` uploads without a signature (needs --trusted-keyring)")
    p.add_argument("--kubernetes-labels", metavar="KUBECONFIG",
                   help="after each verification, label the node's Kubernetes node (fleetctl.io/verified, "
                        "flash-attn-version, recommended-attention...; the hostname is the node name) with these "
                        "credentials: a kubeconfig path, or 'in-cluster' (docs/deploy.md, Kubernetes)")
    p.add_argument("--otel-endpoint", metavar="URL",
                   help="send each ended rollout as an OpenTelemetry trace to this OTLP/HTTP collector "
                        "(http://collector:4318; needs the [otel] extra; docs/operations.md, Traces)")
    p.add_argument("--notify-webhook", action="append", metavar="URL",
                   help="POST a JSON notification to URL when any rollout pauses, awaits approval, fails, completes "
                        "or is aborted (repeatable; docs/rollout.md, Notifications)")
    # knobs that also have an environment variable (the flag wins)
    p.add_argument("--rollout-lease-ttl", metavar="S", help="rollout lease TTL (default 15; FLEET_ROLLOUT_LEASE_TTL)")
    p.add_argument("--no-scheduler", dest="scheduler", action="store_const", const="off",
                   help="run no verification schedules in this controller (FLEET_SCHEDULER=off)")
    p.add_argument("--scheduler-tick", metavar="S", help="scheduler period (default 5; FLEET_SCHEDULER_TICK)")
    p.add_argument("--drift-debounce", metavar="S",
                   help="delay of a drift re-verification (default 10; FLEET_DRIFT_DEBOUNCE)")
    p.add_argument("--dashboard-session-seconds", metavar="S",
                   help="dashboard login lifetime (default 28800; FLEET_DASHBOARD_SESSION_SECONDS)")
    p.add_argument("--dashboard-session-idle-seconds", metavar="S",
                   help="a dashboard login unused this long ends (default 3600; FLEET_DASHBOARD_SESSION_IDLE_SECONDS)")
    p.add_argument("--db-lock-timeout-ms", metavar="MS",
                   help="wait for a database lock at most this long (default 5000; FLEET_DB_LOCK_TIMEOUT_MS)")
    p.add_argument("--db-statement-timeout-ms", metavar="MS",
                   help="PostgreSQL statement timeout (default 15000; FLEET_DB_STATEMENT_TIMEOUT_MS)")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR (default INFO; FLEET_LOG_LEVEL)")
    p.add_argument("--verify-regression-threshold", metavar="FRACTION",
                   help="a verification this fraction below its GPU model's fleet median is a regression "
                        "(default 0.15; FLEET_VERIFY_REGRESSION_THRESHOLD)")
    p.add_argument("--verify-regression-min-samples", metavar="N",
                   help="other nodes of the model that must have measured a shape before it is compared "
                        "(default 3; FLEET_VERIFY_REGRESSION_MIN_SAMPLES)")
    p.add_argument("--cleanup-interval", metavar="S",
                   help="seconds between the cleanup duty's rounds (default 3600; FLEET_CLEANUP_INTERVAL)")
    p.add_argument("--job-event-retention-days", metavar="DAYS",
                   help="remove the events of jobs finished more than DAYS ago, never the job's status and result "
                        "(default 30; 0: keep forever; FLEET_JOB_EVENT_RETENTION_DAYS)")
    p.add_argument("--enrollment-token-retention-days", metavar="DAYS",
                   help="remove enrollment tokens expired or used up more than DAYS ago (default 7; 0: keep "
                        "forever; FLEET_ENROLLMENT_TOKEN_RETENTION_DAYS)")


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> ControllerSettings:
    """The one place the controller's flags, environment and config file are read (at start-up, before
    anything is built)."""
    knob = _Knobs(args, environ, read_config(config_path(args, environ)))
    trusted_keyring: Path | None = knob.given("trusted_keyring")
    require_signed: bool = knob.given("require_signed")
    check_signing(require_signed, trusted_keyring)
    http_cert: Path | None = knob.given("http_cert")
    http_key: Path | None = knob.given("http_key")
    http_insecure: bool = knob.given("http_insecure")
    check_http_tls(http_cert, http_key, http_insecure)
    per_source, overall = enroll_rates(knob.given("enroll_rate"))
    return ControllerSettings(
        state_dir=knob.given("state_dir"), db_url=knob.given("db"), grpc_listen=knob.given("grpc_listen"),
        enroll_listen=knob.given("enroll_listen"), http_listen=knob.given("http_listen"),
        http_cert=http_cert, http_key=http_key, http_insecure=http_insecure,
        heartbeat_interval=knob.given("heartbeat_interval"), missed_heartbeats=knob.given("missed_heartbeats"),
        extra_names=tuple(knob.given("san")), gc_tuning=knob.given("gc_tuning"),
        upstream=upstream_config(knob.given("upstream_index"), knob.given("wheel_mirror"), knob.given("offline")),
        enroll_per_source=per_source, enroll_overall=overall,
        enroll_approval=knob.given("enroll_approval"),
        agent_cert_lifetime=agent_cert_lifetime(knob.given("agent_cert_lifetime")),
        trusted_keyring=trusted_keyring, require_signed=require_signed, ca_kek_file=knob.read("ca_kek_file", Path),
        kubernetes_labels=knob.given("kubernetes_labels"), otel_endpoint=knob.given("otel_endpoint"),
        rollout_lease_ttl=knob.read("rollout_lease_ttl", _seconds),
        scheduler=knob.read("scheduler", _switch),
        scheduler_tick=knob.read("scheduler_tick", _seconds),
        drift_debounce=knob.read("drift_debounce", _seconds),
        dashboard_session_seconds=knob.read("dashboard_session_seconds", _whole_seconds),
        dashboard_session_idle_seconds=knob.read("dashboard_session_idle_seconds", _whole_seconds),
        db_timeouts=DbTimeouts(lock_ms=knob.read("db_lock_timeout_ms", _milliseconds),
                               statement_ms=knob.read("db_statement_timeout_ms", _milliseconds)),
        log_level=knob.read("log_level", _log_level),
        regression=RegressionPolicy(threshold=knob.read("verify_regression_threshold", _fraction),
                                    min_samples=knob.read("verify_regression_min_samples", _count)),
        notify_webhooks=tuple(check_webhook_url(str(u), "--notify-webhook") for u in knob.given("notify_webhook")),
        cleanup=CleanupPolicy(interval=knob.read("cleanup_interval", _seconds),
                              job_event_retention_days=knob.read("job_event_retention_days", _days),
                              enrollment_token_retention_days=knob.read("enrollment_token_retention_days", _days)),
    )


class _Knobs:
    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str], config: ConfigFile) -> None:
        self.args = args
        self.environ = environ
        self.config = config

    def given(self, dest: str) -> Any:
        """A knob without an environment variable: the flag, else the config file, else the default. Both are
        already typed (argparse's ``type=``, ``read_config``'s type check)."""
        flag_value = getattr(self.args, dest, None)
        if flag_value is not None:
            return flag_value
        return self.config.values.get(dest, FILE_KEYS[dest].default)

    def read(self, dest: str, parse: Callable[[str], T]) -> T:
        """A knob with an environment variable: the flag, else the variable, else the config file, else the
        default; every text goes through ``parse``, which checks the range too."""
        spec = FILE_KEYS[dest]
        flag, env = spec.flag, spec.env
        default: T = spec.default
        given: str | None = getattr(self.args, dest, None)
        source, text = (flag, given) if given is not None else (env, self.environ.get(env))
        if (text is None or text == "") and dest in self.config.values:
            # the file's value is already of the key's type; its range is checked by the same parser
            source, text = f"{dest} in {self.config.path}", str(self.config.values[dest])
        if text is None or text == "":
            return default
        try:
            return parse(text)
        except ValueError as exc:
            raise UsageError(f"{source}={text!r}: {exc}",
                             hint=f"set {flag} or ${env} (or {dest} in the config file) to a valid value, or "
                                  f"leave them unset for the default ({default})") from None


# ---- the config file ------------------------------------------------------------------------------------

CONFIG_ENV = "FLEET_CONFIG"


@dataclass(frozen=True)
class FileKey:
    """One key of the config file: the ``dest`` of its flag, the TOML type it takes, its default (None: unset,
    the example shows it commented out) and one line saying what it is."""

    key: str
    kind: type
    default: Any
    what: str
    env: str = ""

    @property
    def flag(self) -> str:
        """The flag of ``serve`` that sets it: a switch that is on by default has only a --no- flag."""
        return ("--no-" if self.kind is bool and self.default else "--") + self.key.replace("_", "-")


_DEFAULTS = ControllerSettings()
FILE_KEYS: dict[str, FileKey] = {k.key: k for k in (
    FileKey("state_dir", Path, _DEFAULTS.state_dir, "state directory (CA, database, artifacts, controller.json)"),
    FileKey("db", str, None, "database URL (unset: sqlite:///STATE/controller.db; "
            "postgresql+psycopg://user@host/db for PostgreSQL)"),
    FileKey("grpc_listen", str, _DEFAULTS.grpc_listen, "agent port, mutual TLS (HOST:PORT)"),
    FileKey("enroll_listen", str, None, "enrollment port, server TLS (unset: agent port + 1)"),
    FileKey("http_listen", str, _DEFAULTS.http_listen, "HTTP API and dashboard (HOST:PORT)"),
    FileKey("http_cert", Path, None, "PEM certificate (chain) for HTTPS (unset: one issued by the controller's CA)"),
    FileKey("http_key", Path, None, "the PEM private key of http_cert"),
    FileKey("http_insecure", bool, False, "serve PLAIN HTTP, not HTTPS (only on loopback or behind a TLS proxy)"),
    FileKey("heartbeat_interval", float, _DEFAULTS.heartbeat_interval, "heartbeat interval asked of agents, seconds"),
    FileKey("missed_heartbeats", int, _DEFAULTS.missed_heartbeats, "a node missing this many intervals turns offline"),
    FileKey("san", list, (), "more DNS names or IPs for the server certificate"),
    # on for `serve`; ControllerSettings' own default (off) is for controllers embedded in tests
    FileKey("gc_tuning", bool, True, "freeze start-up objects out of the garbage collector's reach and raise "
            "its gen-0 threshold (false: CPython's defaults)"),
    FileKey("upstream_index", str, DEFAULT_INDEX_URL, "PEP 503 index for sdists and dependency wheels "
            "(a local mirror works; \"none\": no index)"),
    FileKey("wheel_mirror", str, None, "fetch flash-attn release wheels from here, not GitHub"),
    FileKey("offline", bool, False, "never fetch: plans use only the artifact store"),
    FileKey("enroll_rate", float, None, "enrollment attempts per second overall (unset: 50, burst 200; "
            "per source address 1/s, burst 20)"),
    FileKey("enroll_approval", bool, False, "every enrollment waits for `fleetctl agents approve HOST`"),
    FileKey("agent_cert_lifetime", float, _DEFAULTS.agent_cert_lifetime, "lifetime of agents' client certificates, "
            "seconds (agents renew when a third is left)"),
    FileKey("trusted_keyring", Path, None, "OpenPGP public keys that may sign `fleetctl artifact add --sig`"),
    FileKey("require_signed", bool, False, "refuse unsigned artifact uploads (needs trusted_keyring)"),
    FileKey("ca_kek_file", Path, None, "on PostgreSQL: seal the CA key kept in the database with the key in this file "
            "(32 random bytes, base64; the same on every controller)", "FLEET_CA_KEK_FILE"),
    FileKey("kubernetes_labels", str, None, "label verified nodes in Kubernetes: a kubeconfig path or "
            "\"in-cluster\" (unset: no labels)"),
    FileKey("otel_endpoint", str, None, "OTLP/HTTP collector for rollout traces, e.g. http://collector:4318 "
            "(unset: no traces)"),
    FileKey("rollout_lease_ttl", float, _DEFAULTS.rollout_lease_ttl, "rollout lease TTL, seconds",
            "FLEET_ROLLOUT_LEASE_TTL"),
    FileKey("scheduler", bool, _DEFAULTS.scheduler, "run due verification schedules in this controller",
            "FLEET_SCHEDULER"),
    FileKey("scheduler_tick", float, _DEFAULTS.scheduler_tick, "how often the scheduler looks for due runs, seconds",
            "FLEET_SCHEDULER_TICK"),
    FileKey("drift_debounce", float, _DEFAULTS.drift_debounce, "delay of a drift re-verification, seconds",
            "FLEET_DRIFT_DEBOUNCE"),
    FileKey("dashboard_session_seconds", int, _DEFAULTS.dashboard_session_seconds, "dashboard login lifetime, seconds",
            "FLEET_DASHBOARD_SESSION_SECONDS"),
    FileKey("dashboard_session_idle_seconds", int, _DEFAULTS.dashboard_session_idle_seconds,
            "a dashboard login unused this long ends, seconds", "FLEET_DASHBOARD_SESSION_IDLE_SECONDS"),
    FileKey("db_lock_timeout_ms", int, _DEFAULTS.db_timeouts.lock_ms, "longest wait for a database lock, ms",
            "FLEET_DB_LOCK_TIMEOUT_MS"),
    FileKey("db_statement_timeout_ms", int, _DEFAULTS.db_timeouts.statement_ms, "PostgreSQL statement timeout, ms",
            "FLEET_DB_STATEMENT_TIMEOUT_MS"),
    FileKey("log_level", str, _DEFAULTS.log_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL", "FLEET_LOG_LEVEL"),
    FileKey("verify_regression_threshold", float, _DEFAULTS.regression.threshold, "a passing verification this "
            "fraction below its GPU model's fleet median is a regression", "FLEET_VERIFY_REGRESSION_THRESHOLD"),
    FileKey("verify_regression_min_samples", int, _DEFAULTS.regression.min_samples, "other nodes of the model that "
            "must have measured a shape before it is compared", "FLEET_VERIFY_REGRESSION_MIN_SAMPLES"),
    FileKey("notify_webhook", list, (), "webhook URLs told about every rollout's pause, approval wait, failure "
            "and completion (docs/rollout.md, Notifications)"),
    FileKey("cleanup_interval", float, _DEFAULTS.cleanup.interval, "seconds between the cleanup duty's rounds",
            "FLEET_CLEANUP_INTERVAL"),
    FileKey("job_event_retention_days", int, _DEFAULTS.cleanup.job_event_retention_days, "remove the events of jobs "
            "finished more than this many days ago (never the job's status and result); 0: keep forever",
            "FLEET_JOB_EVENT_RETENTION_DAYS"),
    FileKey("enrollment_token_retention_days", int, _DEFAULTS.cleanup.enrollment_token_retention_days,
            "remove enrollment tokens expired or used up more than this many days ago; 0: keep forever",
            "FLEET_ENROLLMENT_TOKEN_RETENTION_DAYS"),
)}


@dataclass(frozen=True)
class ConfigFile:
    path: Path | None = None
    values: Mapping[str, Any] = field(default_factory=dict)


def config_path(args: argparse.Namespace, environ: Mapping[str, str]) -> Path | None:
    """``--config``, else ``$FLEET_CONFIG``, else none: no file is read implicitly, so what a controller runs
    with is always on its command line or in its environment (the systemd unit and the image pass --config)."""
    given: Path | None = getattr(args, "config", None)
    return given or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)


def read_config(path: Path | None) -> ConfigFile:
    """The file's keys, each checked against its TOML type; an unknown key or a wrong type stops the start."""
    if path is None:
        return ConfigFile()
    hint = "fix it (`fleet-controller config example` prints every key with its default and type)"
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"config file {path}: {exc.strerror or exc}",
                         hint=f"name a readable file with --config or ${CONFIG_ENV}, or unset both") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}", hint=hint) from None
    values: dict[str, Any] = {}
    for key, value in table.items():
        spec = FILE_KEYS.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, FILE_KEYS, n=1)
            raise UsageError(f"config file {path}: unknown key {key!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""),
                             hint="remove it or correct its name; " + hint)
        values[key] = _typed(spec, value, path, hint)
    return ConfigFile(path, values)


_KIND_TEXT = {Path: "a string (a path)", str: "a string", int: "a whole number", float: "a number",
              bool: "true or false", list: "a list of strings"}


def _typed(spec: FileKey, value: object, path: Path, hint: str) -> Any:
    expected = _KIND_TEXT[spec.kind]
    # bool is an int in Python, but `missed_heartbeats = true` is a mistake
    if spec.kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if spec.kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if spec.kind is bool and isinstance(value, bool):
        return value
    if spec.kind in (str, Path) and isinstance(value, str):
        return Path(value) if spec.kind is Path else value
    if spec.kind is list and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise UsageError(f"config file {path}: {spec.key} = {value!r} is not {expected}",
                     hint=f"write {spec.key} = {_toml(spec.default) if spec.default is not None else expected}; "
                          + hint)


def config_example() -> str:
    """A config file with every key at its default (unset keys commented out), made from ``FILE_KEYS``."""
    lines = ["# fleet-controller config file (TOML): fleet-controller serve --config FILE, or $FLEET_CONFIG.",
             "# A flag wins over its environment variable, which wins over this file, which wins over the default.",
             "# Every key is shown at its default; a commented-out key is unset by default. docs/deploy.md.", ""]
    for spec in FILE_KEYS.values():
        lines.append(f"# {spec.what} ({spec.flag}" + (f"; ${spec.env})" if spec.env else ")"))
        if spec.default is None:
            lines.append(f"# {spec.key} =   ({_KIND_TEXT[spec.kind]})")
        else:
            lines.append(f"{spec.key} = {_toml(spec.default)}")
        lines.append("")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string of printable text is a TOML basic string


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("expected a positive number of seconds, e.g. 5")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a fraction between 0 and 1, e.g. 0.15 for 15 %") from None
    if not 0.0 < value < 1.0:
        raise ValueError("expected a fraction between 0 and 1, e.g. 0.15 for 15 %")
    return value


def _positive_int(expected: str) -> Callable[[str], int]:
    """A parser of whole numbers of at least 1 whose error says ``expected``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(expected) from None
        if value < 1:
            raise ValueError(expected)
        return value
    return parse


_whole_seconds = _positive_int("expected a positive whole number of seconds, e.g. 28800")
_milliseconds = _positive_int("expected a positive whole number of milliseconds, e.g. 5000")
_count = _positive_int("expected a whole number of at least 1, e.g. 3")

MAX_RETENTION_DAYS = 100 * 365


def _days(text: str) -> int:
    """A retention in whole days; 0 keeps forever."""
    expected = f"expected a whole number of days from 0 (keep forever) to {MAX_RETENTION_DAYS}, e.g. 30"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(expected) from None
    if not 0 <= value <= MAX_RETENTION_DAYS:
        raise ValueError(expected)
    return value


def _switch(text: str) -> bool:
    low = text.strip().lower()
    if low in ("on", "1", "true", "yes"):
        return True
    if low in ("off", "0", "false", "no"):
        return False
    raise ValueError("expected on or off")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def check_http_tls(cert: Path | None, key: Path | None, insecure: bool) -> None:
    """The HTTPS options fit together (whether the files load is checked at start, controller/app.py)."""
    if (cert is None) != (key is None):
        raise UsageError("--http-cert and --http-key go together (http_cert and http_key in the config file)",
                         hint="give the certificate and its private key, or neither for one from the controller's CA")
    if insecure and cert is not None:
        raise UsageError("--http-insecure serves plain HTTP: the --http-cert/--http-key given would not be used",
                         hint="drop --http-insecure to serve HTTPS with that certificate, or drop the certificate")


def check_signing(require_signed: bool, trusted_keyring: Path | None) -> None:
    if require_signed and trusted_keyring is None:
        raise UsageError("--require-signed needs --trusted-keyring FILE (the keys a signature must come from)",
                         hint="export the operators' public keys: gpg --export --armor KEYID... > FILE")


MIN_AGENT_CERT_LIFETIME = 30.0


def agent_cert_lifetime(seconds: float) -> float:
    """``--agent-cert-lifetime``, checked: long enough for an agent to renew in time."""
    if not seconds >= MIN_AGENT_CERT_LIFETIME or seconds > 10 * 365 * 86400:
        raise UsageError(f"--agent-cert-lifetime {seconds:g}: out of range",
                         hint=f"give seconds from {MIN_AGENT_CERT_LIFETIME:g} to ten years (default a year)")
    return float(seconds)


def enroll_rates(per_second: float | None) -> tuple[Rate, Rate]:
    """``--enroll-rate N``: N/s overall with a burst of 4 N, and per source address the same (one host may be
    the whole load test)."""
    if per_second is None:
        return ENROLL_PER_SOURCE, ENROLL_OVERALL
    if per_second <= 0:
        raise UsageError(f"--enroll-rate {per_second:g} must be positive", hint="attempts per second, e.g. 500")
    rate = Rate(burst=4 * per_second, per_second=per_second)
    return rate, rate


def upstream_config(index_url: str, wheel_mirror: str | None, offline: bool) -> UpstreamConfig:
    index = None if index_url in ("", "none") else index_url
    for name, url in (("--upstream-index", index), ("--wheel-mirror", wheel_mirror)):
        if url is not None and not url.startswith(("http://", "https://", "file://")):
            raise UsageError(f"{name} {url!r} is not an http(s) or file URL", hint=f"e.g. {name} https://host/path")
    return UpstreamConfig(index_url=index, wheel_mirror=wheel_mirror, offline=offline)

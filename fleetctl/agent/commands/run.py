"""``fleet-agent run``: enroll once, then report facts, heartbeat and run jobs for the controller."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetctl.agent.artifact_jobs import ArtifactJobRunner
from fleetctl.agent.busy_guard import DEFAULT_POLL_S, BusyGuard
from fleetctl.agent.client import (
    APPROVAL_TIMEOUT,
    CONNECT_TIMEOUT,
    RETURN_HOME_AFTER,
    STOP_GRACE,
    Agent,
    AgentConfig,
    NoExecutor,
    controller_targets,
)
from fleetctl.agent.command_hook import CommandHook
from fleetctl.agent.executor import AnsibleJobRunner
from fleetctl.agent.gpu_use import GpuUseSource, NvmlGpuUse, SimulatedGpuUse
from fleetctl.agent.jobs import JobRunner
from fleetctl.agent.kubernetes_hook import KubernetesHook
from fleetctl.agent.probes import Probes, collect_facts
from fleetctl.agent.probes.chroot import probes_in_root
from fleetctl.agent.probes.target_python import default_target_python
from fleetctl.agent.profiles import load_profile
from fleetctl.agent.scheduler_hooks import HookedJobRunner, SchedulerHook
from fleetctl.agent.simexec import SimulatedJobRunner
from fleetctl.agent.slurm_hook import SlurmHook
from fleetctl.agent.verify.job import CompositeRunner, VerifyJobRunner
from fleetctl.fleet.errors import InputError, UsageError
from fleetctl.fleet.facts import NodeFacts
from fleetctl.fleet.text import install_safe_logging


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="work for the controller (enroll, facts, heartbeats, jobs)",
        description="Enroll with a one-time token (first start only; key and certificate are kept in "
                    "--state-dir), then report this node's facts, heartbeat, and run the jobs the controller "
                    "sends, reconnecting with backoff. See docs/fleet.md.")
    p.add_argument("--controller", default=os.environ.get("FLEET_CONTROLLER"), metavar="HOST:PORT[,HOST:PORT...]",
                   help="the controller's agent (mTLS) port, or those of several controllers sharing one database, "
                        "comma-separated, or one name resolving to all of them (each controller started with --san "
                        "NAME): the agent works with one at a time and moves to another when it is lost, keeping its "
                        "running jobs (default: $FLEET_CONTROLLER; docs/ha.md, 'Agent fail-over')")
    p.add_argument("--return-home-after", type=float, default=RETURN_HOME_AFTER, metavar="S",
                   help="with several controllers: while on another controller than its first, how often the agent "
                        "looks whether its first one is back, and returns to it when it holds no job (default "
                        f"{RETURN_HOME_AFTER:g}; 0: never)")
    p.add_argument("--enroll-address", metavar="HOST:PORT[,...]",
                   help="the controllers' enrollment ports (default: each agent port + 1)")
    p.add_argument("--ca", type=Path, metavar="FILE", help="the controller's CA certificate (STATE/ca/ca.pem)")
    p.add_argument("--token", metavar="TOKEN",
                   help="one-time enrollment token (default: $FLEET_AGENT_TOKEN); only needed the first time")
    p.add_argument("--state-dir", type=Path, default=Path("state/agent"), metavar="DIR",
                   help="where the agent keeps its key, certificate and job runs (default: ./state/agent)")
    p.add_argument("--simulate", metavar="PROFILE",
                   help="report the facts of a simulation profile; with --executor ansible (a rehearsal on a machine "
                        "without the GPU): GPU, driver, toolkit and torch from the profile, the target Python and its "
                        "flash-attn probed for real, playbooks run for real; the node stays labelled simulated")
    p.add_argument("--hostname", metavar="H", help="the hostname to enroll as (default: from the facts)")
    p.add_argument("--python", metavar="PATH", help="the target Python interpreter to probe")
    p.add_argument("--root", type=Path, metavar="DIR", help="run playbooks chrooted into this root (simulated node)")
    p.add_argument("--executor", choices=("ansible", "none", "simulated"), default="ansible",
                   help="how jobs are run: ansible-runner (default), none (every job fails: 'no executor'), or "
                        "simulated (with --simulate: agent/simexec.py)")
    p.add_argument("--node-state-dir", type=Path, metavar="DIR",
                   help="where playbooks keep their records and builds on the node (default /var/lib/fleet-agent)")
    p.add_argument("--ansible-python", metavar="PATH",
                   help="interpreter Ansible modules run with on this node (default /usr/bin/python3 if present, "
                        "else the agent's own)")
    p.add_argument("--server-name", metavar="NAME", help="TLS server name to verify (default: the address)")
    p.add_argument("--busy-poll", type=float, default=DEFAULT_POLL_S, metavar="S",
                   help="while a step waits for users' jobs to leave the GPUs, how often GPU use is read "
                        f"(default {DEFAULT_POLL_S:g}; docs/rollout.md, 'Busy GPUs')")
    p.add_argument("--upload-retry-minutes", type=float, default=30.0, metavar="M",
                   help="how long a built wheel's upload to the controller is retried (resumed where it stopped) "
                        "across controller restarts, lost connections, a full disk or database errors there, "
                        "within the job's timeout (default 30)")
    hooks = p.add_argument_group(
        "scheduler hooks", "around each install, build, rollback and verification (docs/operations.md, Schedulers)")
    hooks.add_argument("--scheduler", choices=("none", "slurm", "kubernetes"), default="none",
                       help="the workload scheduler this node belongs to; slurm: drain the node and wait for its "
                            "running jobs before the step, resume it after; kubernetes: cordon the node and evict "
                            "its pods (PodDisruptionBudgets honoured, DaemonSet pods stay), uncordon it after "
                            "(default none)")
    hooks.add_argument("--slurm-node-name", metavar="NAME",
                       help="this node's NodeName in Slurm (default: the short hostname)")
    hooks.add_argument("--kubeconfig", metavar="FILE",
                       help="--scheduler kubernetes: credentials for the API server (default: the pod's service "
                            "account); the node is --hostname (the DaemonSet passes spec.nodeName), else the hostname")
    hooks.add_argument("--drain-timeout", type=float, default=1800.0, metavar="S",
                       help="longest wait for the scheduler's running jobs to end; then the step fails and the node "
                            "is resumed (default 1800)")
    hooks.add_argument("--pre-step-hook", metavar="CMD",
                       help="shell command run before each step; a non-zero exit stops the step (environment: "
                            "FLEET_HOOK_PHASE, FLEET_JOB_KIND, FLEET_JOB_ID, FLEET_ROLLOUT_ID)")
    hooks.add_argument("--post-step-hook", metavar="CMD",
                       help="shell command run after each step whose pre hook succeeded, failed steps too "
                            "(FLEET_STEP_STATUS says how it ended)")
    hooks.add_argument("--step-hook-timeout", type=float, default=600.0, metavar="S",
                       help="longest run of --pre-step-hook or --post-step-hook (default 600)")
    p.add_argument("--log-level", default=os.environ.get("FLEET_LOG_LEVEL", "INFO"), help="logging level")
    p.add_argument("--log-format", choices=("text", "json"), default=os.environ.get("FLEET_LOG_FORMAT", "text"),
                   help="log lines as text (default) or one JSON object each: time, level, logger, message "
                        "($FLEET_LOG_FORMAT)")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT, metavar="S",
                   help="give up with an error (exit 7) when the controller is not reached within S seconds of "
                        f"the start, enrolling or connecting (default {CONNECT_TIMEOUT:g}); once connected, "
                        "outages are retried without end")
    p.add_argument("--approval-timeout", type=float, default=APPROVAL_TIMEOUT, metavar="S",
                   help="how long an enrollment waits for `fleetctl agents approve HOST` before the agent exits "
                        f"(exit 6; a restart goes on waiting) (default {APPROVAL_TIMEOUT:g})")
    p.add_argument("--stop-grace", type=float, default=STOP_GRACE, metavar="S",
                   help="on SIGTERM/SIGINT, how long running jobs get to be canceled and reported before the agent "
                        f"exits (default {STOP_GRACE:g})")
    p.set_defaults(handler=handle)


#: the agent's path options; all made absolute at start (``absolute_paths``)
PATH_OPTIONS = ("state_dir", "node_state_dir", "root", "ca", "python", "ansible_python")


def absolute_paths(args: argparse.Namespace) -> None:
    """Make every path option absolute, against the directory the agent was started in, before anything uses
    it. The playbooks take only absolute paths (a relative ``--state-dir``, the default ``state/agent``, once
    made every install fail validation: the fetched wheel's path was relative), and a job must not depend on
    the agent's working directory, which may change or vanish. Interpreters are made absolute without
    resolving symlinks (a venv's ``bin/python`` is one, and resolving it would leave the venv); a bare
    interpreter name (``python3``) is looked up on PATH."""
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if value is None or value == "":
            continue
        text = os.path.expanduser(str(value))
        if name in ("python", "ansible_python") and os.sep not in text:
            found = shutil.which(text)
            if found is None:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} {text!r}: no such interpreter on PATH",
                                 hint=f"give {flag} as a path, e.g. /opt/venv/bin/python")
            text = found
        absolute = os.path.abspath(text)
        setattr(args, name, Path(absolute) if isinstance(value, Path) else absolute)


def make_facts_source(args: argparse.Namespace) -> Any:
    if args.simulate:
        facts = load_profile(args.simulate, args.hostname)
        if args.executor == "ansible":
            return rehearsal_facts(facts, args.python, getattr(args, "root", None))

        def simulated() -> NodeFacts:
            return facts

        return simulated

    def probed() -> NodeFacts:
        return collect_facts(args.python, hostname=args.hostname)

    return probed


def rehearsal_facts(profile: NodeFacts, python: str | None,
                    root: Path | None = None) -> Callable[[], NodeFacts]:
    """Simulated GPU, real target Python: the profile's facts with ``python`` and ``flash_attn`` probed in the
    target interpreter each time (so an install or an uninstall by the playbooks shows in the next report).
    With ``root`` (the node's Debian root the playbooks chroot into) the target Python and ``nvcc`` are probed
    inside that root (agent/probes/chroot.py), so the toolkit the cuda-toolkit playbook installs is reported too.
    ``extra`` says ``simulated: true`` and ``rehearsal: true``."""

    def facts() -> NodeFacts:
        probes = probes_in_root(root) if root is not None else Probes()
        interpreter = python or default_target_python()
        target = probes.target.probe(interpreter)
        extra = {**profile.extra, "simulated": True, "rehearsal": True, "target_python": interpreter,
                 "probe_errors": list(target.errors)}
        if root is None:
            return dataclasses.replace(profile, python=target.python, flash_attn=target.flash_attn, extra=extra)
        nvcc = probes.nvcc.probe()
        extra.update(node_root=str(root), toolkits=[t.to_json() for t in nvcc.toolkits])
        extra["probe_errors"] += list(nvcc.errors)
        return dataclasses.replace(profile, python=target.python, flash_attn=target.flash_attn,
                                   toolkit=nvcc.active, extra=extra)

    return facts


def labelled(facts: Callable[[], NodeFacts], executor: str) -> Callable[[], NodeFacts]:
    """Facts that say how this agent runs jobs (``extra.executor``): the controller fetches real artifacts only
    for nodes whose playbooks really run (``ansible``), never for ``simulated`` ones."""

    def report() -> NodeFacts:
        f = facts()
        return dataclasses.replace(f, extra={**f.extra, "executor": executor})

    return report


def ansible_python(args: argparse.Namespace) -> str:
    if getattr(args, "ansible_python", None):
        return str(args.ansible_python)
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def gpu_use(args: argparse.Namespace) -> GpuUseSource:
    """Where the busy check reads GPU use: NVML, or for a simulated node (--simulate) its simulated GPUs, held by
    processes named in STATE/simulated-gpu-use/gpu<N>.pid (agent/gpu_use.py)."""
    if args.simulate:
        return SimulatedGpuUse(args.state_dir, [g.index for g in load_profile(args.simulate, args.hostname).gpus])
    return NvmlGpuUse()


def make_runner(args: argparse.Namespace) -> JobRunner:
    absolute_paths(args)  # idempotent; handle() has done it already
    if args.executor in ("none", "simulated"):  # simulated: replaced by agent.simexec in handle()
        return NoExecutor()
    # job runs go to STATE/jobs/<job_id>/ (the runner adds jobs/ itself)
    playbooks = AnsibleJobRunner(args.state_dir, root=args.root, python_interpreter=ansible_python(args),
                                 node_state_dir=getattr(args, "node_state_dir", None))
    # verify jobs run agent/verify/bench.py in the node's target Python (agent/verify/job.py)
    composite = CompositeRunner({"verify": VerifyJobRunner(target_python(args), args.state_dir / "verify")}, playbooks)
    # the node leaves its scheduler around each disturbing step, once the step's artifacts are here
    # inside the hooks: a drained node gets no new job while the step waits for its GPUs to be idle
    guarded = BusyGuard(composite, gpu_use(args), poll_s=getattr(args, "busy_poll", DEFAULT_POLL_S))
    hooked = HookedJobRunner(guarded, scheduler_hooks(args))
    # sdists and wheels come from the controller's artifact store; built wheels go back there
    return ArtifactJobRunner(hooked, args.state_dir / "artifacts",
                             upload_retry_s=args.upload_retry_minutes * 60)


def scheduler_hooks(args: argparse.Namespace) -> list[SchedulerHook]:
    """The hooks of --scheduler and --pre/--post-step-hook, in the order they take the node (scheduler first)."""
    for flag in ("drain_timeout", "step_hook_timeout"):
        if getattr(args, flag) <= 0:
            option = "--" + flag.replace("_", "-")
            raise UsageError(f"{option} {getattr(args, flag):g}: must be more than 0 seconds",
                             hint=f"e.g. {option} 600")
    hooks: list[SchedulerHook] = []
    if args.scheduler == "slurm":
        node = args.slurm_node_name or socket.gethostname().split(".")[0]
        hooks.append(SlurmHook(node, drain_timeout_s=args.drain_timeout))
    if args.scheduler == "kubernetes":
        hooks.append(KubernetesHook(args.hostname or socket.gethostname(), kubeconfig=args.kubeconfig,
                                    drain_timeout_s=args.drain_timeout))
    if args.pre_step_hook or args.post_step_hook:
        hooks.append(CommandHook(args.pre_step_hook, args.post_step_hook, timeout_s=args.step_hook_timeout))
    return hooks


def target_python(args: argparse.Namespace) -> Callable[[], str | None]:
    """The interpreter verify jobs use: --python, else the one the facts probe reports (cached)."""
    found: list[str | None] = []

    def python() -> str | None:
        if args.python:
            return str(args.python)
        if not found:
            try:
                found.append(make_facts_source(args)().python.executable)
            except Exception as exc:  # a failing probe: bench.py then runs in the agent's own Python
                logging.getLogger(__name__).warning("cannot probe the target python: %s", exc)
                found.append(None)
        return found[0]

    return python


async def _main(cfg: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            logging.getLogger(__name__).info("%s received: stopping", sig.name)
        stop.set()

    # installed before anything else runs: a signal is honoured while enrolling and waiting for approval too
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    agent = Agent(cfg)
    if hasattr(cfg.runner, "bind"):  # the simulated executor uploads built wheels through the agent
        cfg.runner.bind(agent)
    await agent.run(stop)


def handle(args: argparse.Namespace) -> int:
    # every message one line, control characters escaped: node- and client-supplied text is logged (fleet/text.py)
    install_safe_logging(args.log_level.upper(), json_lines=args.log_format == "json")
    if args.return_home_after < 0:
        raise UsageError(f"--return-home-after {args.return_home_after:g}: must be 0 (never) or more seconds",
                         hint="e.g. --return-home-after 300")
    if not args.controller:
        raise UsageError("no controller given", hint="pass --controller HOST:PORT (several: comma-separated) or set "
                                                     "FLEET_CONTROLLER")
    try:
        controller_targets(args.controller)
        if args.enroll_address:
            controller_targets(args.enroll_address)
    except InputError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    absolute_paths(args)
    facts, runner = make_facts_source(args), make_runner(args)
    if args.executor == "simulated":  # a simulated node's jobs change its simulated facts (agent/simexec.py)
        if not args.simulate:
            raise UsageError("--executor simulated needs --simulate PROFILE", hint="real nodes use --executor ansible")
        simulated = SimulatedJobRunner(facts, args.state_dir / "jobs")
        runner, facts = BusyGuard(simulated, gpu_use(args), poll_s=args.busy_poll), simulated.current_facts
    if args.executor != "ansible" and (args.scheduler != "none" or args.pre_step_hook or args.post_step_hook):
        raise UsageError(f"scheduler hooks need --executor ansible (this agent runs --executor {args.executor})",
                         hint="drop --scheduler and --pre/--post-step-hook, or run jobs with --executor ansible")
    cfg = AgentConfig(controller=args.controller, state_dir=args.state_dir, facts=labelled(facts, args.executor),
                      runner=runner, ca_file=args.ca,
                      token=args.token or os.environ.get("FLEET_AGENT_TOKEN"),
                      enroll_address=args.enroll_address, hostname=args.hostname, server_name=args.server_name,
                      upload_retry_s=args.upload_retry_minutes * 60, connect_timeout=args.connect_timeout,
                      approval_timeout=args.approval_timeout, stop_grace=args.stop_grace,
                      return_home_after=args.return_home_after)
    asyncio.run(_main(cfg))
    return 0

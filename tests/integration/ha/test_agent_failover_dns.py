"""Agents that know their controllers by one DNS name with several addresses fail over between them (issue 17):
``fleet-agent run --controller ctl.fleet.test:PORT``, nothing else — no address list, no ``--enroll-address`` (it is
the name's port + 1), no ``--server-name`` (the controllers' certificates carry the name: ``--san``).

The name resolves to two addresses through an ``/etc/hosts`` of the agents' own: each agent runs in a mount namespace
(``unshare --mount``) where a file of the test's is bind-mounted over ``/etc/hosts``; the test's process and the rest
of the machine keep theirs. Linux routes all of 127.0.0.0/8 to the loopback interface, so two controller processes on
one PostgreSQL database of the test's own listen on 127.0.0.2 and 127.0.0.3 at the same ports. gRPC's default
resolver (c-ares) reads ``/etc/hosts`` and hands the channel both addresses; ``pick_first`` dials them in a shuffled
order and takes the next when one refuses — no fail-over code of the agent's is involved: with one entry, ``Failover``
is the plain reconnect delay, and every new session resolves the name again.

The controller holding the most agents is killed (``kill -9``) while 6 s verify jobs run: its agents reach the other
address through the same name, their session leases move there (``agent_sessions``), the jobs are re-attached and
recorded once. The killed controller is then restarted and the other one killed: every agent goes back through the
name. A name the certificates do not carry is refused by the agents' TLS check. Needs root (``unshare``, ``mount``).
The figures: docs/ha.md, 'Agent fail-over'."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.ha.failover_rig import FailoverRig, failover_database, kill_and_measure, query
from tests.integration.rollout.controller_proc import ControllerProc, free_port, until

pytestmark = [pytest.mark.postgres, pytest.mark.root, pytest.mark.timeout(240)]

NAME = "ctl.fleet.test"  # the controllers' name, in their certificates
UNKNOWN_NAME = "other.fleet.test"  # resolves to the same addresses; no certificate carries it
ADDRESSES = ("127.0.0.2", "127.0.0.3")
HOSTS = [f"dns-node-{i}" for i in range(4)]
RECONNECT_WITHIN_S = 5.0  # as with a list: the initial backoff (0.5 s), a refused dial, a handshake


def hosts_file(tmp: Path) -> Path:
    path = tmp / "hosts"
    path.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {NAME} {UNKNOWN_NAME}\n" for a in ADDRESSES))
    return path


def launcher(hosts: Path) -> tuple[str, ...]:
    """A command prefix running its command in a mount namespace of its own with ``hosts`` as ``/etc/hosts``
    (``exec``: the agent keeps the pid the test started, so that SIGTERM reaches it)."""
    return ("unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts))


@pytest.fixture
def name_launcher(tmp_path: Path) -> tuple[str, ...]:
    """The agents' launcher, once it is seen to work: the name resolves to both addresses inside it and both can be
    listened on; otherwise the test is skipped, saying what is missing."""
    missing = [tool for tool in ("unshare", "mount", "getent") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (util-linux, libc-bin) to give the agents an /etc/hosts of their own")
    prefix = launcher(hosts_file(tmp_path))
    probe = subprocess.run([*prefix, "getent", "ahostsv4", NAME], capture_output=True, text=True, timeout=30)
    resolved = {line.split()[0] for line in probe.stdout.splitlines() if line.strip()}
    if probe.returncode != 0 or resolved != set(ADDRESSES):
        pytest.skip(f"no mount namespace with an /etc/hosts of its own here (needs root and unshare(CLONE_NEWNS)): "
                    f"`unshare --mount ... getent ahostsv4 {NAME}` exited {probe.returncode} with "
                    f"{sorted(resolved) or 'nothing'} {probe.stderr.strip()[:200]}")
    for address in ADDRESSES:
        try:
            free_port_on([address])
        except OSError as exc:
            pytest.skip(f"cannot listen on {address} (Linux routes 127.0.0.0/8 to lo; this system does not): {exc}")
    return prefix


def free_port_on(addresses: list[str]) -> int:
    """A port free on every address, with the next one free too (the enrollment port the agent derives)."""
    for _ in range(100):
        port = free_port()
        try:
            for address in addresses:
                for p in (port, port + 1):
                    with socket.socket() as s:
                        s.bind((address, p))
        except OSError:
            continue
        return port
    raise OSError(f"no port P with P and P+1 free on all of {addresses} in 100 tries")


@dataclass
class NameRig(FailoverRig):
    """Controllers on 127.0.0.2 and 127.0.0.3 at the same ports, certificates naming ``NAME``; agents given only
    ``name:PORT``."""

    name: str = NAME  # the name the agents dial

    async def start_controllers(self) -> None:
        port = free_port_on(list(ADDRESSES))
        for i, address in enumerate(ADDRESSES[:self.controllers]):
            cp = ControllerProc(self.tmp / f"ctl-{i}" / "controller", self.heartbeat, db=self.db_url,
                                missed=self.missed, host=address, san=(NAME,),
                                ports={"grpc": port, "enroll": port + 1, "http": free_port_on([address])})
            cp.start()  # one CA for all: the database's
            await cp.ready()
            self.ctl.append(cp)

    @property
    def controller_list(self) -> str:
        return f"{self.name}:{self.ctl[0].ports['grpc']}"

    def controller_args(self) -> list[str]:
        return ["--controller", self.controller_list]


def pid(cp: ControllerProc) -> int:
    assert cp.proc is not None
    return cp.proc.pid


async def test_agents_fail_over_between_the_addresses_of_one_controller_name(
        tmp_path: Path, name_launcher: tuple[str, ...]) -> None:
    with failover_database() as db:
        rig = NameRig(db, tmp_path, controllers=2, launcher=name_launcher)
        try:
            await rig.start_controllers()
            await rig.start_agents(HOSTS)  # enrolled through NAME:PORT+1
            await rig.wait_online()
            first = Counter(rig.holders().values())
            print(f"\nagents per address at the start: "
                  f"{ {cp.host: first.get(pid(cp), 0) for cp in rig.ctl} }")
            victim = max(rig.ctl, key=lambda cp: first.get(pid(cp), 0))
            for round_ in range(2):
                survivor = next(cp for cp in rig.ctl if cp is not victim)
                jobs = await rig.submit_verify(via=survivor)
                assert sorted(jobs) == sorted(HOSTS), jobs
                ids = list(jobs.values())
                await rig.wait_running(ids)
                run = await kill_and_measure(rig, jobs, victim)
                print(f"round {round_ + 1}: killed {run.killed} holding {len(run.moved)} agent(s): reconnected "
                      f"{run.reconnected_s:.2f}s, sessions on {survivor.host} {run.lease_moved_s:.2f}s, results "
                      f"{run.results_s:.2f}s after the kill ({run.job_left_s:.2f}s of the jobs were left)")
                assert run.moved, "the killed controller held no agent"
                assert run.reconnected_s < RECONNECT_WITHIN_S, run
                # every session on the other address, and only ever dialled as the name
                assert set(rig.holders().values()) == {pid(survivor)}, rig.holders()
                dialled = {where for agent in rig.agents for _, where in agent.sessions()}
                assert dialled == {rig.controller_list}, dialled

                # the jobs ran on, once each; result, events and verification recorded once
                statuses = {job_id: status for job_id, (status, _) in rig.job_rows(ids).items()}
                assert set(statuses.values()) == {"successful"}, statuses
                started = Counter(j for agent in rig.agents for j in agent.jobs_started() if j in ids)
                assert started == Counter(ids), started
                events = query(db, "SELECT job_id, event, counter FROM job_events WHERE job_id = ANY(%s)", ids)
                per_job = Counter((job_id, event) for job_id, event, _ in events)
                for job_id in ids:
                    assert per_job[(job_id, "fleet_job_started")] == 1, per_job
                    assert per_job[(job_id, "fleet_job_finished")] == 1, per_job
                assert len({(j, c) for j, _, c in events}) == len(events)

                async def verifications(ids: list[str] = ids) -> Counter[str]:
                    found = Counter(j for (j,) in query(db, "SELECT job_id FROM verifications WHERE job_id = ANY(%s)",
                                                        ids))
                    return found if len(found) == len(ids) else Counter()

                assert await until(verifications, 15, interval=0.1) == Counter(ids)
                await rig.wait_online(30)

                # back at its address and port; the next round kills the other one: the agents come back to it
                victim.start()
                await victim.ready()
                victim = survivor
        finally:
            rig.stop()


async def test_a_name_the_controllers_certificates_do_not_carry_is_refused(
        tmp_path: Path, name_launcher: tuple[str, ...]) -> None:
    """The agent checks the controller's certificate against the name it dials: ``other.fleet.test`` reaches the same
    controllers, whose certificates name only ``ctl.fleet.test`` (and their addresses); the agent stops at once with
    an error saying to add the name (``--san``), before it enrolls."""
    with failover_database() as db:
        rig = NameRig(db, tmp_path, controllers=2, launcher=name_launcher, name=UNKNOWN_NAME)
        try:
            await rig.start_controllers()
            await rig.start_agents(HOSTS[:1])
            agent = rig.agents[0]
            assert agent.proc is not None
            code = agent.proc.wait(timeout=30)  # at once: not retried as an outage (connect timeout 60 s)
            log = agent.log_path.read_text(errors="replace")
            assert code == 6, log  # error[tls]
            assert log.count("error[tls]") == 1 and "does not name the host it was dialled as" in log, log
            assert "--san NAME" in log, log
            assert not (agent.state_dir / "identity.json").exists()
            assert query(db, "SELECT count(*) FROM nodes") == [(0,)]
        finally:
            rig.stop()

"""What every program's command line shares (fleet/cli.py): --version and `version`, `completion bash|zsh`,
`-o table|wide|json|yaml` (--json an alias), global options before or after the subcommand."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleetctl.agent.main import main as fleet_agent
from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.main import main as fleet_controller
from fleetctl.fleet.version import package_version


def _run(main: object, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    assert callable(main)
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # --version exits the way --help does
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("main", "prog"), [(fleetctl, "fleetctl"), (fleet_agent, "fleet-agent"),
                                            (fleet_controller, "fleet-controller")])
def test_every_program_says_its_version(main: object, prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(main, capsys, "--version")
    assert rc == 0 and out.startswith(f"{prog} {package_version()} (Python ")
    rc, out, _ = _run(main, capsys, "version", "--json")
    versions = json.loads(out)
    local = versions.get("client", versions)  # fleetctl's also has the controller's
    assert rc == 0 and local["version"] == package_version() and local["python"] and local["platform"]


def test_fleetctl_version_says_when_the_controller_is_not_reachable(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(fleetctl, capsys, "version", "--state-dir", str(tmp_path))
    assert rc == 0 and out.splitlines()[0].startswith("fleetctl ")
    assert "controller: not reachable (no controller found" in out
    rc, out, _ = _run(fleetctl, capsys, "--controller", "http://127.0.0.1:9", "version", "-o", "yaml")
    doc = yaml.safe_load(out)
    assert rc == 0 and doc["client"]["version"] == package_version()
    assert "cannot reach the controller at http://127.0.0.1:9" in doc["controller"]["error"]


@pytest.mark.parametrize("before", [True, False])
def test_global_options_work_before_and_after_the_subcommand(before: bool, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--controller", "http://127.0.0.1:9", "--state-dir", str(tmp_path)]
    argv = [*flags, "nodes"] if before else ["nodes", *flags]
    (tmp_path / "admin.token").write_text("t0ken\n")  # found through --state-dir: the request is made
    rc, _, err = _run(fleetctl, capsys, *argv)
    assert rc == 7 and "cannot reach the controller at http://127.0.0.1:9" in err


def test_the_option_after_the_subcommand_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "admin.token").write_text("t0ken\n")
    rc, _, err = _run(fleetctl, capsys, "--controller", "http://127.0.0.1:8", "nodes", "--controller",
                      "http://127.0.0.1:9", "--state-dir", str(tmp_path))
    assert rc == 7 and "http://127.0.0.1:9" in err and "127.0.0.1:8" not in err


def test_output_format_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(fleetctl, capsys, "nodes", "-o", "xml")
    assert rc == 2 and "invalid choice: 'xml'" in err and "hint:" in err


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_is_valid_and_lists_the_subcommands(shell: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(fleetctl, capsys, "completion", shell)
    assert rc == 0
    script = tmp_path / f"fleetctl.{shell}"
    script.write_text(out)
    subprocess.run(["bash", "-n", str(script)], check=True)  # zsh's script is the bash functions + bashcompinit
    top_level = next(line for line in out.splitlines() if line.strip().startswith('"") echo'))
    offered = top_level.split('"')[3].split()  # `"") echo "plan catalog …" ;;`: the program's subcommands
    assert {"nodes", "node", "rollout", "verifications", "attention", "version", "completion"} <= set(offered)


def _complete(script: Path, *words: str) -> list[str]:
    """What bash completes after ``words`` (the last word is the one being typed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    cmd = (f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _fleetctl; "
           'printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True)
    return done.stdout.split()


def test_bash_completion_completes_subcommands_flags_and_choices(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _run(fleetctl, capsys, "completion", "bash")  # warm the import; the script below comes from a fresh process
    script = tmp_path / "fleetctl.bash"
    script.write_text(subprocess.run([sys.executable, "-m", "fleetctl.controller.cli", "completion", "bash"],
                                     check=True,
                                     capture_output=True, text=True).stdout)
    assert {"nodes", "node"} <= set(_complete(script, "fleetctl", "no"))
    assert _complete(script, "fleetctl", "rollout", "st") == ["status"]
    assert "--output" in _complete(script, "fleetctl", "nodes", "--o")
    assert _complete(script, "fleetctl", "nodes", "-o", "") == ["table", "wide", "json", "yaml"]
    assert "--controller" in _complete(script, "fleetctl", "--con")  # global options before the subcommand
    assert _complete(script, "fleetctl", "completion", "") == ["bash", "zsh", "fish"]


def _fish_complete(script: Path, line: str) -> list[str]:
    """What fish completes for the command line ``line`` (its last word is the one being typed)."""
    done = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C {shlex.quote(line)}"],
                          check=True, capture_output=True, text=True, timeout=60)
    return [candidate.split("\t")[0] for candidate in done.stdout.splitlines()]


def test_fish_completion_completes_subcommands_flags_and_choices(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert shutil.which("fish"), "fish is not installed: ./scripts/bootstrap installs Debian's fish package"
    rc, out, _ = _run(fleetctl, capsys, "completion", "fish")
    assert rc == 0
    script = tmp_path / "fleetctl.fish"
    script.write_text(out)
    subprocess.run(["fish", "--no-config", "-n", str(script)], check=True, timeout=60)  # it parses
    assert {"nodes", "node"} <= set(_fish_complete(script, "fleetctl no"))
    assert _fish_complete(script, "fleetctl rollout st") == ["status"]
    assert "--output" in _fish_complete(script, "fleetctl nodes --o")
    assert sorted(_fish_complete(script, "fleetctl nodes -o ")) == ["json", "table", "wide", "yaml"]
    assert "--controller" in _fish_complete(script, "fleetctl --con")  # global options before the subcommand
    assert sorted(_fish_complete(script, "fleetctl completion ")) == ["bash", "fish", "zsh"]
    assert "--selector" in _fish_complete(script, "fleetctl rollout flash-attn --sel")
    assert "use-context" in _fish_complete(script, "fleetctl config u")

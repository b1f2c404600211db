"""fleetctl.agent.verify.runner: subprocess, timeout with process-group kill, parsing, real bench.py without torch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import venv
from datetime import datetime
from pathlib import Path

import pytest

from fleetctl.agent.verify.runner import BENCH_PATH, VerifyRequest, run_verification
from fleetctl.agent.verify.simulated import simulate_verification
from fleetctl.fleet.errors import UsageError


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the target python: ``fake BENCH --mode ... --out FILE ...``."""
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n"
                    "args = sys.argv[2:]\nout = args[args.index('--out') + 1]\n" + body)
    path.chmod(0o755)
    return str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (re)parent is dead for our purposes
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # the "bench" starts a child that ignores SIGTERM (like a stuck CUDA worker), then hangs
    fake = _fake_python(tmp_path, f"""
import signal, subprocess
child = subprocess.Popen(["sleep", "300"], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
time.sleep(300)
""")
    t0 = time.monotonic()
    result = run_verification(VerifyRequest(python=fake, mode="quick", timeout_s=2.0, kill_grace_s=0.5,
                                            workdir=tmp_path))
    elapsed = time.monotonic() - t0
    assert result.status == "timeout" and not result.passed
    assert "did not finish within 2 s" in result.reasons[0]
    assert "process group was killed" in result.reasons[0]
    assert elapsed < 15
    leader, child = map(int, pids.read_text().split())
    deadline = time.monotonic() + 5
    while (_alive(leader) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(leader) and not _alive(child)


def test_timeout_keeps_partial_result(tmp_path: Path, at: datetime) -> None:
    doc = simulate_verification("H100", node="n", at=at).to_json()
    fake = _fake_python(tmp_path, f"""
import signal
doc = json.loads({json.dumps(json.dumps(doc))})
def on_term(*_):
    doc.update(status="timeout", passed=False, reasons=["overall timeout reached"])
    json.dump(doc, open(out, "w"))
    os._exit(124)
signal.signal(signal.SIGTERM, on_term)
time.sleep(300)
""")
    result = run_verification(VerifyRequest(python=fake, timeout_s=1.5, kill_grace_s=3, workdir=tmp_path))
    assert result.status == "timeout"
    assert result.speed  # what was measured before the kill is kept
    assert any("did not finish" in r for r in result.reasons)


def test_nan_output_is_a_correctness_failure(tmp_path: Path, at: datetime) -> None:
    doc = simulate_verification("H100", node="n", at=at).to_json()
    assert doc["status"] == "pass"
    for e in doc["correctness"]:
        if e["impl"] == "flash_attn":
            e["fwd_rel_err"] = math.nan  # Python's json writes NaN; the bench claims "pass"
    fake = _fake_python(tmp_path, f"open(out, 'w').write({json.dumps(json.dumps(doc))})\n")
    result = run_verification(VerifyRequest(python=fake, workdir=tmp_path))
    assert result.status == "fail" and not result.passed
    assert any("correctness flash_attn" in r and "fwd relative error is nan" in r for r in result.reasons)


def test_crash_without_output(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path, "sys.stderr.write('Segmentation fault in flash_attn_2_cuda\\n'); sys.exit(139)\n")
    result = run_verification(VerifyRequest(python=fake, workdir=tmp_path))
    assert result.status == "error"
    assert "wrote no result file" in result.reasons[0] and "exit code 139" in result.reasons[0]
    assert result.log_tail is not None and "Segmentation fault" in result.log_tail


def test_invalid_output(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path, "json.dump({'schema_version': 1, 'simulated': 'no'}, open(out, 'w'))\n")
    result = run_verification(VerifyRequest(python=fake, workdir=tmp_path))
    assert result.status == "error"
    assert "not a valid verification result: simulated: expected true/false" in result.reasons[0]


def test_missing_interpreter(tmp_path: Path) -> None:
    result = run_verification(VerifyRequest(python=str(tmp_path / "nope"), workdir=tmp_path))
    assert result.status == "error" and "could not start the target python" in result.reasons[0]


def test_command_line() -> None:
    req = VerifyRequest(python="/x/python", mode="full", model_path="/models/qwen", timeout_s=100,
                        timeout_per_shape_s=5, expect="sdpa")
    cmd = req.command(Path("/tmp/o.json"))
    assert cmd[:2] == ["/x/python", str(BENCH_PATH)]
    assert cmd[cmd.index("--timeout") + 1] == "85"  # leaves the bench time to write a partial result
    assert cmd[cmd.index("--model") + 1] == "/models/qwen"
    assert cmd[cmd.index("--expect") + 1] == "sdpa"
    with pytest.raises(UsageError):
        VerifyRequest(python="p", mode="slow")


@pytest.fixture(scope="module")
def torchless_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    env_dir = tmp_path_factory.mktemp("venv-no-torch")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    return str(env_dir / "bin" / "python")


def test_real_bench_without_torch(torchless_python: str, tmp_path: Path) -> None:
    probe = subprocess.run([torchless_python, "-c", "import torch"], capture_output=True, check=False)
    assert probe.returncode != 0, "the throwaway venv unexpectedly has torch"
    result = run_verification(VerifyRequest(python=torchless_python, mode="full", workdir=tmp_path))
    assert result.status == "no-torch" and not result.passed and not result.simulated
    assert "torch is not importable" in result.reasons[0] and torchless_python in result.reasons[0]
    assert "No module named 'torch'" in result.reasons[0]


def test_real_bench_stdout_mode(torchless_python: str) -> None:
    out = subprocess.run([torchless_python, str(BENCH_PATH), "--mode", "quick"], capture_output=True, text=True,
                         timeout=60, check=True)
    doc = json.loads(out.stdout)
    assert doc["status"] == "no-torch" and doc["schema_version"] == 1 and doc["simulated"] is False


TORCH_PYTHON = os.environ.get("FLEET_TEST_TORCH_PYTHON")


@pytest.mark.skipif(not TORCH_PYTHON, reason="set FLEET_TEST_TORCH_PYTHON to a python with (CPU) torch")
def test_real_bench_with_cpu_torch_reports_no_gpu(tmp_path: Path) -> None:
    assert TORCH_PYTHON
    result = run_verification(VerifyRequest(python=TORCH_PYTHON, mode="quick", workdir=tmp_path,
                                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}))
    assert result.status == "no-gpu"
    assert "torch.cuda.is_available() is False" in result.reasons[0]


@pytest.mark.skipif(not TORCH_PYTHON, reason="set FLEET_TEST_TORCH_PYTHON to a python with (CPU) torch")
def test_real_bench_cpu_debug_run_with_faults(tmp_path: Path) -> None:
    """The supervisor/worker machinery end to end on CPU: a hung shape is killed and recorded,
    the worker restarts and the rest still runs; NaN fails correctness."""
    assert TORCH_PYTHON
    result = run_verification(VerifyRequest(
        python=TORCH_PYTHON, mode="quick", device="cpu", timeout_s=240, timeout_per_shape_s=4, workdir=tmp_path,
        extra_args=("--tokens", "256", "--seqlens", "128"),
        inject=("hang:speed/sdpa_flash/bfloat16", "nan:correctness/sdpa_flash/float16")))
    assert result.status == "fail"  # no flash_attn in that venv
    assert any("flash_attn import failed" in r for r in result.reasons)
    hung = [e for e in result.speed if e.impl == "sdpa_flash" and e.direction == "fwd"]
    assert [e.status for e in hung] == ["timeout"] and "per-task timeout" in (hung[0].reason or "")
    assert result.restarts == 1
    assert any(e.impl == "sdpa_math" and e.status == "ok" for e in result.speed)  # ran after the restart
    nan = [e for e in result.correctness if e.impl == "sdpa_flash" and e.dtype == "float16"]
    assert nan and all(e.status == "fail" and "fwd" in e.nonfinite for e in nan)

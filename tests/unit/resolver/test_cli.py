"""fleetctl plan / catalog / diagnose: output, bad input and exit codes (docs/cli.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.controller.cli import main
from tests.unit.resolver.nodes import node_dict

EXAMPLE = Path(__file__).parents[2] / "fixtures" / "node_facts_example.json"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, name: str, content: object) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_plan_json_matches_golden(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "--facts", str(EXAMPLE), "--json", "--state-dir", str(tmp_path)], capsys)
    golden = json.loads((EXAMPLE.parent / "golden_plan_example.json").read_text())
    assert code == 0 and json.loads(out) == golden


def test_plan_table_and_explain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "--facts", str(EXAMPLE), "--state-dir", str(tmp_path)], capsys)
    assert code == 0 and "gpu-h100-01" in out and "fa1-source" in out and "3 node(s)" in out
    code, out, _ = run(["plan", "--facts", str(EXAMPLE), "--explain", "gpu-h100-01", "--state-dir", str(tmp_path)],
                       capsys)
    assert code == 0 and "FLASH_ATTN_CUDA_ARCHS=90" in out and "rejected:" in out
    code, _, err = run(["plan", "--facts", str(EXAMPLE), "--explain", "nope", "--state-dir", str(tmp_path)], capsys)
    assert code == 4 and "no node 'nope'" in err


@pytest.mark.parametrize(("content", "message"), [
    ("not json {", "is not JSON"),
    ({"hosts": []}, 'expected an object with a "nodes" list'),
    ({"nodes": []}, "lists no nodes"),
])
def test_plan_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object, message: str) -> None:
    code, _, err = run(["plan", "--facts", write(tmp_path, "f.json", content)], capsys)
    assert code == 3 and message in err and "hint:" in err


def test_plan_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["plan", "--facts", "/nonexistent/facts.json"], capsys)
    assert code == 3 and "cannot read facts file" in err


def test_plan_bad_nodes_still_plans_good_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_version = node_dict(hostname="bad-cuda", torch__cuda="12.x")
    missing = {k: v for k, v in node_dict(hostname="no-python").items() if k != "python"}
    facts = {"nodes": [node_dict(hostname="good"), bad_version, missing, "junk"]}
    code, out, err = run(["plan", "--facts", write(tmp_path, "f.json", facts), "--json", "--state-dir",
                          str(tmp_path)], capsys)
    assert code == 3
    nodes = json.loads(out)["nodes"]
    assert [n["hostname"] for n in nodes] == ["good", "bad-cuda", "no-python", "#3"]
    assert nodes[0]["variant"] == "fa2-wheel"
    assert [n["variant"] for n in nodes[1:]] == ["blocked"] * 3
    assert "field torch.cuda: '12.x' is not a valid CUDA version" in nodes[1]["reasons"][0]
    assert "field python: missing" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--version", "latest"], "is not a version"),
    (["--version", "1.0.9"], "not a FlashAttention 2 release"),
    (["--version", "2.x"], "is not a version"),
])
def test_plan_bad_version(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, _, err = run(["plan", "--facts", str(EXAMPLE), *argv], capsys)
    assert code == 2 and message in err


def test_plan_catalog_and_policy_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = write(tmp_path, "c.txt", "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp311-cp311-linux_x86_64.whl\n")
    code, out, _ = run(["plan", "--facts", str(EXAMPLE), "--catalog", catalog, "--json"], capsys)
    a100 = json.loads(out)["nodes"][1]
    assert code == 0 and a100["artifact"].startswith("flash_attn-2.8.3+") and a100["flash_attn_version"] == "2.8.3"
    bad_catalog = write(tmp_path, "bad.txt", "flash_attn-oops.whl\n")
    code, _, err = run(["plan", "--facts", str(EXAMPLE), "--catalog", bad_catalog], capsys)
    assert code == 3 and "bad.txt line 1: malformed wheel filename" in err
    policy = write(tmp_path, "p.json", {"fa4": True})
    code, out, _ = run(["plan", "--facts", str(EXAMPLE), "--policy", policy, "--json", "--state-dir", str(tmp_path)],
                       capsys)
    assert code == 0 and json.loads(out)["nodes"][0]["variant"] == "fa4"
    code, _, err = run(["plan", "--facts", str(EXAMPLE), "--policy", write(tmp_path, "q.json", {"fa5": True})], capsys)
    assert code == 3 and "unknown policy field(s) fa5" in err


def test_catalog_add_import_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path)]
    name = "flash_attn-2.8.3.post1+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    code, out, _ = run(["catalog", *state, "add", name, "--sha256", "a" * 64, "--cuda-archs", "90"], capsys)
    assert code == 0 and "added" in out
    code, out, _ = run(["plan", "--facts", str(EXAMPLE), "--json", *state], capsys)
    assert json.loads(out)["nodes"][0]["artifact"] == name
    code, _, err = run(["catalog", *state, "add", "flash_attn-2.8.3.whl"], capsys)
    assert code == 3 and "malformed wheel filename" in err
    listing = write(tmp_path, "more.txt", "flash_attn-2.8.3+cu12torch2.9cxx11abiTRUE-cp312-cp312-linux_x86_64.whl\n")
    code, out, _ = run(["catalog", *state, "import", listing], capsys)
    assert code == 0 and "1 new" in out
    code, out, _ = run(["catalog", *state, "list", "--version", "2.8.3.post1", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["wheels"]) == 49
    code, out, _ = run(["catalog", *state, "list"], capsys)
    assert code == 0 and "2.8.3.post1" in out and "default target: 2.8.3.post1" in out
    code, _, err = run(["catalog", *state, "list", "--version", "2.0.7"], capsys)
    assert code == 4 and "no wheels for flash-attn 2.0.7" in err


def test_diagnose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write(tmp_path, "build.log", "x\ng++: fatal error: Killed signal terminated program cc1plus\n")
    code, out, _ = run(["diagnose", log], capsys)
    assert code == 0 and "[compile_oom] line 2" in out and "retry-lower-jobs" in out
    code, out, _ = run(["diagnose", log, "--json"], capsys)
    assert code == 0 and json.loads(out)["diagnoses"][0]["id"] == "compile_oom"
    code, out, _ = run(["diagnose", write(tmp_path, "ok.log", "fine\n")], capsys)
    assert code == 1 and "no known" in out
    code, _, err = run(["diagnose", "/nonexistent.log"], capsys)
    assert code == 3 and "cannot read log" in err


def test_diagnose_explain_shows_the_regex_and_the_matched_text(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    text = "ok\nERROR: flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl is not a supported " \
           "wheel on this platform.\n"
    code, out, _ = run(["diagnose", write(tmp_path, "pip.log", text), "--explain"], capsys)
    assert code == 0 and "[wheel_not_supported_platform] line 2" in out
    assert "regex:  flash_attn-" in out and "is not a supported wheel on this platform'" in out
    assert "characters 10–" in out and "source: https://github.com/McGill-NLP/nano-aha-moment/issues/3" in out
    code, out, _ = run(["diagnose", write(tmp_path, "pip.log", text), "--json"], capsys)
    found = json.loads(out)["diagnoses"][0]
    assert found["span"][0] == 10 and found["match"].startswith("flash_attn-2.8.3")

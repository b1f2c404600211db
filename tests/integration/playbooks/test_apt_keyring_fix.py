"""apt-keyring-fix against a real Debian root, real apt and gpg, a signed repo served over HTTP."""

from __future__ import annotations

import pytest

from tests.integration.harness.fixtures import AptWorld, NodeDriver, skip_reason, tree_digest, write_failing_source

pytestmark = [pytest.mark.root, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


@pytest.mark.parametrize("fmt", ["list", "sources"])
def test_fixes_no_pubkey_and_is_idempotent(node: NodeDriver, apt_world: AptWorld, fmt: str) -> None:
    src = write_failing_source(node, apt_world, fmt)
    other_before = node.node.file("/etc/apt/sources.list.d/other.sources").read_bytes()
    node.node.file("/etc/apt/trusted.gpg.d").mkdir(parents=True, exist_ok=True)
    node.node.file("/etc/apt/trusted.gpg.d/cuda-legacy.gpg").write_bytes(apt_world.key_binary.read_bytes())
    node.node.file("/etc/apt/trusted.gpg.d/unrelated.gpg").write_bytes(apt_world.other_keyring.read_bytes())
    # the legacy apt-key copy makes apt trust it already; drop it from the "before" picture
    legacy = node.node.file("/etc/apt/trusted.gpg.d/cuda-legacy.gpg").read_bytes()
    node.node.file("/etc/apt/trusted.gpg.d/cuda-legacy.gpg").unlink()
    rc, out = node.apt_update()
    assert rc != 0 and "NO_PUBKEY" in out, out
    node.node.file("/etc/apt/trusted.gpg.d/cuda-legacy.gpg").write_bytes(legacy)

    vars = {"repo_uri": apt_world.cuda_uri, "keyring_name": "cuda-archive-keyring",
            "key_path": str(apt_world.key_armored), "key_fingerprint": apt_world.cuda_fpr}
    first = node.run("apt-keyring-fix", vars)
    assert first.outcome.status == "successful", first.outcome.error
    assert first.outcome.changed > 0
    res = first.outcome.result["apt_keyring_fix"]
    assert res["fingerprints"] == [apt_world.cuda_fpr]
    assert res["sources_rewritten"] == [f"/etc/apt/sources.list.d/cuda.{fmt}"]
    assert res["legacy_removed"] == ["/etc/apt/trusted.gpg.d/cuda-legacy.gpg"]
    assert not node.node.file("/etc/apt/trusted.gpg.d/cuda-legacy.gpg").exists()
    assert node.node.file("/etc/apt/trusted.gpg.d/unrelated.gpg").exists()
    text = src.read_text()
    if fmt == "list":
        assert f"deb [arch=amd64 signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {apt_world.cuda_uri} /" in text
    else:
        assert "Signed-By: /usr/share/keyrings/cuda-archive-keyring.gpg\n" in text
    assert node.node.file("/etc/apt/sources.list.d/other.sources").read_bytes() == other_before
    rc, out = node.apt_update()
    assert rc == 0 and "NO_PUBKEY" not in out and "W:" not in out, out
    assert any(e["event"] == "playbook_on_stats" for e in first.events)

    second = node.run("apt-keyring-fix", vars)
    assert second.outcome.status == "successful", second.outcome.error
    assert second.outcome.changed == 0, second.outcome.result["stats"]


@pytest.mark.parametrize("which", ["missing.asc", "garbage.asc"])
def test_bad_key_url_fails_clearly_and_leaves_sources(node: NodeDriver, apt_world: AptWorld, which: str) -> None:
    write_failing_source(node, apt_world, "list")
    before = tree_digest(node.root, "/etc/apt")
    job = node.run("apt-keyring-fix", {"repo_uri": apt_world.cuda_uri, "keyring_name": "cuda-archive-keyring",
                                       "key_url": f"{apt_world.url}/keys/{which}"})
    assert job.outcome.status == "failed"
    assert job.outcome.error is not None
    if which == "missing.asc":
        assert "could not download the key" in job.outcome.error and "404" in job.outcome.error
    else:
        assert "not an OpenPGP public key" in job.outcome.error
    assert "sources left unchanged" in job.outcome.error
    assert tree_digest(node.root, "/etc/apt") == before
    assert not node.node.file("/usr/share/keyrings/cuda-archive-keyring.gpg").exists()


def test_key_from_url_binary(node: NodeDriver, apt_world: AptWorld) -> None:
    write_failing_source(node, apt_world, "sources")
    job = node.run("apt-keyring-fix", {"repo_uri": apt_world.cuda_uri, "keyring_name": "cuda-archive-keyring",
                                       "key_url": f"{apt_world.url}/keys/cuda.gpg",
                                       "key_id": apt_world.cuda_fpr[-16:]})
    assert job.outcome.status == "successful", job.outcome.error
    rc, out = node.apt_update()
    assert rc == 0, out

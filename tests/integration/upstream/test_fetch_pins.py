"""A released file name never changes content: the controller pins the digest it first stored for a name, and
a later fetch of that name bringing other bytes is refused (real HTTP: FakeUpstream; real store: SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetctl.controller.artifacts import ArtifactStore
from fleetctl.controller.store import open_store
from fleetctl.controller.upstream import Upstream, UpstreamConfig
from fleetctl.fleet.errors import UpstreamError
from tests.integration.harness.upstream import FakeUpstream
from tests.integration.harness.wheels import build_wheel


def test_a_refetch_must_bring_the_bytes_first_stored_under_that_name(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    arts = ArtifactStore(tmp_path / "artifacts", store)
    wheel = build_wheel(tmp_path / "v1", version="2.8.3", local="cu12torch2.11cxx11abiTRUE")
    with FakeUpstream(tmp_path / "up") as up:
        url = up.add_release_asset("2.8.3", wheel)
        upstream = Upstream(UpstreamConfig(index_url=None), arts)
        first = upstream.fetch_file([url], wheel.name, "wheel")
        assert up.fetched(wheel.name) == 1
        assert upstream.fetch_file([url], wheel.name, "wheel") == first  # from the store: no second download
        assert up.fetched(wheel.name) == 1

        # the stored copy is lost, and upstream now serves other bytes under the released name
        arts.path_for(first.sha256).unlink()
        changed = build_wheel(tmp_path / "v2", version="2.8.3", local="cu12torch2.11cxx11abiTRUE", extra="X = 1\n")
        assert changed.name == wheel.name
        up.add_release_asset("2.8.3", changed)
        with pytest.raises(UpstreamError, match=r"refused .* sha256") as err:
            upstream.fetch_file([url], wheel.name, "wheel")
        assert "replaced upstream" in (err.value.hint or "")
        assert {a.sha256 for a in arts.find(wheel.name)} == {first.sha256}  # nothing new stored
        assert not list((tmp_path / "artifacts" / "tmp").glob("*"))  # no partial file left

        # the original bytes come back: accepted again
        up.add_release_asset("2.8.3", wheel)
        assert upstream.fetch_file([url], wheel.name, "wheel").sha256 == first.sha256
    store.close()

"""Story test fixtures: the playbook harness (tests/integration/harness/fixtures.py) plus the controller
fixture from tests/integration/conftest.py."""

from tests.integration.harness.fixtures import apt_world, debian_base_root, node_layer

__all__ = ["apt_world", "debian_base_root", "node_layer"]

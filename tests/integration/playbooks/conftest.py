"""Playbook test fixtures: imported from tests/integration/harness/fixtures.py.

(``pytest_plugins`` is only honoured in the root conftest, which the controller tests own,
so the fixtures are imported here instead.)
"""

from tests.integration.harness.fixtures import apt_world, debian_base_root, node, node_layer

__all__ = ["apt_world", "debian_base_root", "node", "node_layer"]

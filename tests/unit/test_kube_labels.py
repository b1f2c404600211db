"""fleetctl.fleet.kube_nodes: label values a Kubernetes API server accepts, and our labels for a node."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from fleetctl.fleet.kube_nodes import LABEL_PREFIX, label_value, node_labels

VALID = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")  # apimachinery's label value rule


def test_versions_become_label_values() -> None:
    assert label_value("2.8.3.post2") == "2.8.3.post2"
    assert label_value("2.7.1+cu126") == "2.7.1_cu126"
    assert label_value("-x" + "9" * 80) == "x" + "9" * 61


@given(st.text(max_size=100))
def test_any_text_becomes_a_valid_value(text: str) -> None:
    assert VALID.match(label_value(text))


def test_a_nodes_labels_and_the_ones_it_loses() -> None:
    labels = node_labels(flash_attn_version="2.8.3", verification="regression", recommended_attention="sdpa_cudnn",
                         simulated=True)
    assert all(key.startswith(LABEL_PREFIX) for key in labels)
    assert labels == {"fleetctl.io/flash-attn-version": "2.8.3", "fleetctl.io/verification": "regression",
                      "fleetctl.io/verified": "false", "fleetctl.io/recommended-attention": "sdpa_cudnn",
                      "fleetctl.io/simulated": "true"}
    never = node_labels(flash_attn_version=None, verification=None, recommended_attention=None, simulated=False)
    assert set(never.values()) == {None}  # removed, not left stale

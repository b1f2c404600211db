"""Token limits as the controller checks them, and the agent versions a controller supports."""

from __future__ import annotations

import pytest

from fleetctl.controller.enrollment import TokenLimits
from fleetctl.fleet.errors import InputError
from fleetctl.fleet.version import AgentSupport, agent_support, supported_agent_versions


def test_token_limits_are_normalised() -> None:
    limits = TokenLimits(uses=50, hostname_pattern="gpu-[0-9]*", source_network=" 10.1.2.3/8 ").checked()
    assert limits.source_network == "10.0.0.0/8" and limits.uses == 50


@pytest.mark.parametrize("limits, message", [
    (TokenLimits(uses=0), "out of range"),
    (TokenLimits(uses=100_001), "out of range"),
    (TokenLimits(hostname="bad host"), "not a valid hostname"),
    (TokenLimits(hostname_pattern="gpu-*\n"), "not a hostname pattern"),
    (TokenLimits(source_network="10.0.0.0/99"), "--source-network"),
])
def test_bad_token_limits(limits: TokenLimits, message: str) -> None:
    with pytest.raises(InputError) as err:
        limits.checked()
    assert message in err.value.message


@pytest.mark.parametrize("agent, expected", [
    ("0.1.0", AgentSupport.SUPPORTED), ("0.2.0", AgentSupport.SUPPORTED), ("0.2.0.post1", AgentSupport.SUPPORTED),
    ("0.0.9", AgentSupport.TOO_OLD), ("0.3.0", AgentSupport.TOO_NEW), (None, AgentSupport.UNKNOWN),
    ("unknown", AgentSupport.UNKNOWN),
])
def test_agent_support_against_a_controller(agent: str | None, expected: AgentSupport) -> None:
    assert agent_support(agent, controller="0.2.0") == expected


def test_supported_range_is_stated() -> None:
    assert supported_agent_versions("0.2.0") == ">=0.1.0,<=0.2.0"
    assert supported_agent_versions("unknown") == ">=0.1.0"
    assert agent_support("9.9.9", controller="unknown") == AgentSupport.SUPPORTED

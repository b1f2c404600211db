"""gRPC failures as the agent's errors (``rpc_error``): the TLS failures that no retry fixes — a CA that does not
verify the controller, a certificate that does not carry the name dialled (a controller name with several addresses
needs ``--san NAME`` on every controller: docs/ha.md) — are ``CertificateTrustError``s with a hint saying which
setting to fix; an unreachable controller stays an outage to retry. The details are grpcio's own (1.85)."""

from __future__ import annotations

import grpc
import grpc.aio

from fleetctl.agent.client import rpc_error
from fleetctl.fleet.errors import CertificateTrustError, ControllerUnavailable


def failure(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def test_a_certificate_without_the_name_dialled_says_to_add_the_name() -> None:
    err = rpc_error(failure(grpc.StatusCode.UNAVAILABLE,
                            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.3:7444: Custom "
                            "verification check failed with error: UNAUTHENTICATED: Hostname Verification Check "
                            "failed."), "enrollment")
    assert isinstance(err, CertificateTrustError)
    assert err.message.startswith("enrollment: the controller's certificate does not name the host it was dialled as")
    assert "ipv4:127.0.0.3:7444" in err.message
    assert err.hint is not None and "--san NAME" in err.hint and "--server-name" in err.hint


def test_a_ca_that_does_not_verify_the_controller_says_to_pass_its_ca() -> None:
    err = rpc_error(failure(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
                            "ipv4:127.0.0.1:7443: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
                            "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get "
                            "local issuer certificate: OK"), "session")
    assert isinstance(err, CertificateTrustError)
    assert "TLS handshake with the controller failed" in err.message
    assert err.hint is not None and "--ca" in err.hint


def test_a_controller_that_refuses_connections_is_an_outage_to_retry() -> None:
    err = rpc_error(failure(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
                            "ipv4:127.0.0.2:7443: Failed to connect to remote host: Connection refused"), "session")
    assert type(err) is ControllerUnavailable
    assert err.code == "controller-unavailable"

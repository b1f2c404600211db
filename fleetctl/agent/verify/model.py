"""The verification result model, as the agent uses it.

The schema is shared with the controller, so it lives in ``fleet.verification``
(the agent may not import the controller and vice versa); this module is the
agent-side name for it.
"""

from fleetctl.fleet.verification import (
    SCHEMA_VERSION,
    STATUS_ERROR,
    STATUS_FAIL,
    STATUS_NO_GPU,
    STATUS_NO_TORCH,
    STATUS_PASS,
    STATUS_REGRESSION,
    STATUS_TIMEOUT,
    THRESHOLDS,
    CorrectnessEntry,
    DeviceInfo,
    E2EEntry,
    FlashAttnStatus,
    SpeedEntry,
    Verdict,
    VerificationResult,
    VerificationSchemaError,
    evaluate,
    failure_result,
    parse_result,
)

__all__ = [
    "SCHEMA_VERSION",
    "STATUS_ERROR",
    "STATUS_FAIL",
    "STATUS_NO_GPU",
    "STATUS_NO_TORCH",
    "STATUS_PASS",
    "STATUS_REGRESSION",
    "STATUS_TIMEOUT",
    "THRESHOLDS",
    "CorrectnessEntry",
    "DeviceInfo",
    "E2EEntry",
    "FlashAttnStatus",
    "SpeedEntry",
    "Verdict",
    "VerificationResult",
    "VerificationSchemaError",
    "evaluate",
    "failure_result",
    "parse_result",
]

"""The gRPC server's interceptor that times every agent RPC into ``fleet_controller_grpc_request_duration_seconds``
(controller/telemetry.py), by method and final status code."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fleetctl.controller.telemetry import GRPC_SECONDS


def _code_of(context: grpc.aio.ServicerContext[Any, Any], failed: bool) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode.UNKNOWN.name if failed else grpc.StatusCode.OK.name


class RpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in the stubs only
    """Times every RPC by method and final status code (``fleet_controller_grpc_request_duration_seconds``)."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_timed_call(handler.unary_unary, method))  # type: ignore[attr-defined, no-any-return]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_timed_call(handler.stream_unary, method))  # type: ignore[attr-defined, no-any-return]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_timed_stream(handler.unary_stream, method))  # type: ignore[attr-defined, no-any-return]
        return handler


def _timed_call(inner: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started, failed = time.perf_counter(), True
        try:
            result = await inner(request, context)
            failed = False
            return result
        finally:
            GRPC_SECONDS.labels(method, _code_of(context, failed)).observe(time.perf_counter() - started)
    return timed


def _timed_stream(inner: Callable[..., Any], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started, failed = time.perf_counter(), True
        try:
            async for item in inner(request, context):
                yield item
            failed = False
        finally:
            GRPC_SECONDS.labels(method, _code_of(context, failed)).observe(time.perf_counter() - started)
    return timed

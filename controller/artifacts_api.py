"""HTTP upload into the controller's artifact store: ``POST /api/v1/artifacts?filename=F&kind=K[&sha256=H]``.

The request body is the file itself (``application/octet-stream``), streamed into ``ArtifactStore.writer``
(sha256 and size checked, atomic rename, safe names, size limit: controller/artifacts.py). This is how an
operator puts an sdist, a wheel or an apt key in the store (``fleetctl artifact add FILE``); agents use
the gRPC ``UploadArtifact``/``FetchArtifact`` instead. ``GET /api/v1/artifacts`` lists them (controller/api.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from controller.api import API_PREFIX, Admin, Ctx
from controller.audit import audit
from fleet.errors import InputError


def router() -> APIRouter:
    r = APIRouter(prefix=API_PREFIX)

    @r.post("/artifacts")
    async def upload(request: Request, ctx: Ctx, actor: Admin, filename: str, kind: str = "other",
                     sha256: str | None = None) -> dict[str, Any]:
        length = request.headers.get("content-length")
        size = int(length) if length and length.isdigit() else None
        writer = ctx.artifacts.writer(filename, kind, expected_sha256=sha256, expected_size=size)
        try:
            async for chunk in request.stream():
                if chunk:
                    writer.write(chunk)
            if writer.size == 0:
                raise InputError("empty upload", hint="send the file as the request body")
            info = writer.commit()
        except BaseException:
            writer.abort()
            raise
        audit(ctx.store, actor, "artifact.add", info.sha256, filename=info.filename, kind=info.kind, size=info.size)
        return info.to_json()

    return r

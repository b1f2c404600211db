"""HTTP upload into the controller's artifact store: ``POST /api/v1/artifacts?filename=F&kind=K[&sha256=H]``
``[&bundle_lock=L&bundle=NAME]``.

The request body is the file itself (``application/octet-stream``), streamed into ``ArtifactStore.writer``
(sha256 and size checked, atomic rename, safe names, size limit: controller/artifacts.py). This is how an
operator puts an sdist, a wheel or an apt key in the store (``fleetctl artifact add FILE``); agents use
the gRPC ``UploadArtifact``/``FetchArtifact`` instead. ``GET /api/v1/artifacts[?kind=K]`` lists them
(controller/api.py); ``GET /api/v1/artifacts/{sha256}/content`` gives one back to an operator — how
``fleetctl agents install`` takes the agent's own wheels (kind ``agent``) to nodes that have no index.

Provenance: the file is recorded as added by the authenticated admin (``user`` and the actor: the admin user
whose API token it was, or ``admin`` for the admin token), or, with
``bundle_lock`` (the sha256 of the bundle's lock.json, which lists this file), as imported from that bundle
(``fleetctl bundle import``). Either way an operator vouched for it, so it may enter the catalog and plans.

Signatures (``fleetctl artifact add FILE --sig FILE.sig``): header ``X-Fleet-Signature`` carries the detached
OpenPGP signature, base64. A controller with ``--trusted-keyring`` checks it over the complete file before
storing it (``controller/signatures.py``) and records the signer's fingerprint in the ``user`` provenance; a
bad or unknown signature, or none under ``--require-signed``, is refused (422 ``bad-signature``, an
``artifact.add.refused`` audit row, nothing stored).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from fleetctl.controller.artifacts import Provenance, check_sha256
from fleetctl.controller.audit import audit
from fleetctl.controller.http_deps import API_PREFIX, Admin, Ctx, Operator
from fleetctl.controller.signatures import SignatureError
from fleetctl.fleet.errors import InputError

SIGNATURE_HEADER = "X-Fleet-Signature"  # base64 of a detached OpenPGP signature of the body (binary or armored)


def _signature(value: str | None, filename: str) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{filename}: the {SIGNATURE_HEADER} header is not base64; nothing stored",
                             hint="send the detached signature file base64-encoded (fleetctl artifact add --sig "
                                  "does)") from exc


def router() -> APIRouter:
    r = APIRouter(prefix=API_PREFIX)

    @r.post("/artifacts")
    async def upload(request: Request, ctx: Ctx, principal: Admin, filename: str, kind: str = "other",
                     sha256: str | None = None, bundle_lock: str | None = None,
                     bundle: str = "") -> dict[str, Any]:
        actor = principal.name  # who authenticated: an admin user's API token, or "admin" (the admin token)
        length = request.headers.get("content-length")
        size = int(length) if length and length.isdigit() else None
        signature = _signature(request.headers.get(SIGNATURE_HEADER), filename)
        provenance = (Provenance.bundle(check_sha256(bundle_lock), actor, bundle[:255]) if bundle_lock
                      else Provenance.user(actor))
        writer = ctx.artifacts.writer(filename, kind, provenance=provenance, expected_sha256=sha256,
                                      expected_size=size)
        try:
            async for chunk in request.stream():
                if chunk:
                    writer.write(chunk)
            if writer.size == 0:
                raise InputError("empty upload", hint="send the file as the request body")
            path = writer.seal()
            if not bundle_lock:  # an operator's own upload: its signature checked (controller/signatures.py)
                try:
                    signer = await asyncio.to_thread(ctx.signatures.check, path, signature, writer.filename)
                except SignatureError as exc:
                    audit(ctx.store, actor, "artifact.add.refused", writer.sha256 or "", filename=writer.filename,
                          reason=exc.message)
                    raise
                if signer is not None:
                    provenance = writer.provenance = Provenance.user(actor, **signer.detail())
            info = writer.commit()
        except BaseException:
            writer.abort()
            raise
        audit(ctx.store, actor, "artifact.add", info.sha256, filename=info.filename, kind=info.kind, size=info.size,
              source=str(provenance.source), ref=provenance.ref)
        return info.to_json()

    @r.get("/artifacts/{sha256}/content")
    def content(sha256: str, ctx: Ctx, _: Operator) -> FileResponse:
        info = ctx.artifacts.get(check_sha256(sha256))  # unknown: NotFound, with its hint
        return FileResponse(ctx.artifacts.path_for(info.sha256), filename=info.filename,
                            media_type="application/octet-stream")

    return r

"""The OpenAPI schema is for admins only, and the Swagger/ReDoc pages are off (issue 13; docs/security.md,
"State and identity hygiene")."""

from __future__ import annotations

import httpx
import pytest

from fleetctl.controller.app import RunningController

pytestmark = pytest.mark.timeout(60)


async def test_openapi_schema_needs_the_admin_token_and_docs_pages_are_off(controller: RunningController) -> None:
    assert controller.ctx.http_url
    async with httpx.AsyncClient(base_url=controller.ctx.http_url) as http:
        anonymous = await http.get("/api/v1/openapi.json")
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "auth"
        wrong = await http.get("/api/v1/openapi.json", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        for page in ("/docs", "/redoc", "/openapi.json", "/api/v1/docs", "/api/v1/redoc"):
            assert (await http.get(page)).status_code == 404, page
        admin = await http.get("/api/v1/openapi.json",
                               headers={"Authorization": f"Bearer {controller.ctx.admin_token}"})
        assert admin.status_code == 200
        paths = admin.json()["paths"]
        assert "/api/v1/nodes" in paths and "/api/v1/openapi.json" not in paths

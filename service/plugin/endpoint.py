"""The ``vllm.endpoint_plugins`` entry point: installs capture on every worker when the OpenAI API server
starts, and adds ``GET /residue/status`` (each worker's capture and sender counters, as JSON).

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``VLLM_PLUGINS=residue``), and the
worker methods exist only when the server runs with ``--worker-extension-cls`` set to
``residue_monitor.service.plugin.worker.ResidueWorkerExtension``; ``launch.vllm_command`` sets both.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class ResidueEndpoint:
    """vLLM ``EndpointPlugin``: one status route plus the install call at start-up."""

    name = "residue"
    required_tasks: tuple[str, ...] | None = ("generate",)

    def __init__(self) -> None:
        self._engine: Any = None

    def attach_router(self, app: Any) -> None:
        from fastapi.responses import JSONResponse  # pyright: ignore[reportMissingImports]  # vLLM ships it

        async def status() -> Any:
            return JSONResponse(await self._call("residue_stats"))

        app.add_api_route("/residue/status", status, methods=["GET"], include_in_schema=False)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        self._engine = engine_client
        if engine_client is None:
            return
        result = await self._call("residue_install")
        for i, st in enumerate(result.get("workers", [])):
            if st.get("active"):
                logger.info(
                    "residue capture on (worker %d): CLT %s → %s", i, st.get("clt_id"), st.get("target")
                )
            else:
                logger.warning("residue capture off (worker %d): %s", i, st.get("reason"))

    async def _call(self, method: str) -> dict[str, Any]:
        if self._engine is None:
            return {"error": "no engine"}
        try:
            return {"workers": await self._engine.collective_rpc(method)}
        except Exception as e:  # the API server must start whatever happens here
            logger.error(
                "residue: %s failed (%s: %s); is --worker-extension-cls set?", method, type(e).__name__, e
            )
            return {"error": f"{type(e).__name__}: {e}"}

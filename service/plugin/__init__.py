"""The vLLM plugin: live residue capture inside the engine (DESIGN.md §4).

Three pieces, all through vLLM's own extension points:

* ``register`` — the ``vllm.general_plugins`` entry point (every vLLM process). Idempotent, imports
  nothing heavy, checks the settings once and logs what capture will do. Off unless ``RESIDUE_ENABLED=1``;
  ``RESIDUE_DISABLE=1`` is the kill switch.
* ``worker.ResidueWorkerExtension`` — given to vLLM as ``--worker-extension-cls``; its
  ``residue_install`` RPC puts PyTorch module hooks on the worker's model (``capture.py``) and starts the
  background sender (``sender.py``).
* ``endpoint.ResidueEndpoint`` — the ``vllm.endpoint_plugins`` entry point (loaded when
  ``VLLM_PLUGINS`` names ``residue``): calls ``residue_install`` on every worker when the API server
  starts, and serves ``GET /residue/status``.

``launch.vllm_command`` builds the command line and environment that switch all three on.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """vLLM general-plugin entry point: validate the settings once per process; never raises."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from residue_monitor.service.plugin.config import PluginConfig

        cfg = PluginConfig.from_env()
    except Exception as e:  # a bad setting turns capture off, it never stops vLLM
        logger.error("residue plugin: invalid settings, capture stays off: %s", e)
        return
    if cfg.disabled:
        logger.info("residue plugin: RESIDUE_DISABLE is set; capture is off")
    elif cfg.enabled:
        logger.debug("residue plugin: capture on, sidecar %s, CLT %s", cfg.target, cfg.clt_path or "(unset)")

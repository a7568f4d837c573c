"""The command line and environment that start vLLM's OpenAI server with residue capture on.

Used by the demo, the benchmarks and the tests, and printed by ``residue vllm-command`` for operators::

    VLLM_PLUGINS=residue RESIDUE_ENABLED=1 RESIDUE_CLT=<folder> RESIDUE_SIDECAR_TARGET=localhost:50051 \\
    python -m vllm.entrypoints.openai.api_server --model <folder> \\
        --worker-extension-cls residue_monitor.service.plugin.worker.ResidueWorkerExtension --enforce-eager
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from residue_monitor.service.plugin.worker import EXTENSION

PLUGIN_NAME = "residue"
"""The entry-point name of both the general and the endpoint plugin (what ``VLLM_PLUGINS`` lists)."""


def vllm_command(
    model: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    capture: bool = True,
    clt: str = "",
    target: str = "localhost:50051",
    served_model_name: str = "",
    max_model_len: int = 1024,
    dtype: str = "auto",
    extra_args: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) for ``python -m vllm.entrypoints.openai.api_server``.

    ``capture=False`` gives the same server without the plugin (the overhead baseline). ``settings``:
    further ``RESIDUE_*`` variables (sampling, token, TLS). CPU-friendly defaults: eager mode (module hooks
    need it), a 1 GiB KV cache.
    """
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        dtype,
        "--enforce-eager",
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    if capture:
        argv += ["--worker-extension-cls", EXTENSION]
        env |= {
            "VLLM_PLUGINS": PLUGIN_NAME,
            "RESIDUE_ENABLED": "1",
            "RESIDUE_CLT": clt,
            "RESIDUE_SIDECAR_TARGET": target,
        }
    else:
        env |= {"RESIDUE_DISABLE": "1"}
    env |= dict(settings or {})
    return argv + list(extra_args), env

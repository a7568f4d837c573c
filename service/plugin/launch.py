"""The command line and environment that start vLLM's OpenAI server with residue capture on.

Used by the demo, the benchmarks and the tests; for operators it amounts to (README "The vLLM plugin")::

    VLLM_PLUGINS=residue RESIDUE_ENABLED=1 RESIDUE_CLT=<folder> RESIDUE_SIDECAR_TARGET=localhost:50051 \\
    python -m vllm.entrypoints.openai.api_server --model <folder> \\
        --worker-extension-cls residue_monitor.service.plugin.worker.ResidueWorkerExtension --enforce-eager
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence

from residue_monitor.service.plugin.worker import EXTENSION


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class VllmServer:
    """A ``python -m vllm.entrypoints.openai.api_server`` child process (demo, benchmarks, tests).

    ``start`` waits for ``/health``; ``stop`` sends SIGTERM (vLLM drains and stops its engine processes)
    and kills the process group after ``grace_s``. The log goes to ``log_path``.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: str, port: int) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0) -> VllmServer:
        log = open(self.log_path, "ab")  # noqa: SIM115  # handed to the child; closed in stop()
        self._log = log
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self.proc.returncode} while starting; see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM did not become healthy in {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # engine-core / worker children left behind
        self._log.close()
        self.proc = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

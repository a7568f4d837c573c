"""The whole stack as three processes: vLLM's OpenAI server with the plugin, ``residue serve`` (the
sidecar) and a private redis-server, on the tiny model with a random transcoder and a fingerprint fitted
offline (HF reference path) on one shell family against the controls.

vLLM starts first, while the sidecar is still down: serving is unaffected, the plugin keeps what it
captured in its bounded queue and delivers it once the sidecar is up.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from deploy.grafana.livecheck import SidecarProcess, serve_sidecar
from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.request import GenerationConfig, analyze_prompt
from residue_monitor.detectors.signature import SignatureBuilder
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.models import load_hf
from residue_monitor.service.plugin.launch import VllmServer, vllm_command
from residue_monitor.shells.catalog import get_shell, load_controls
from residue_monitor.shells.fingerprint import FitConfig, fit_fingerprint, save_fingerprints
from tests.integration.conftest import RedisServer, self_signed
from tests.integration.vllm_fixtures import (
    SidecarProc,
    free_port,
    get,
    need_vllm,
    post,
    tiny_vllm_clt,
    tiny_vllm_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.redis]

MAX_TOKENS, DECODE_EVERY = 12, 4
SHELL = "v1_memtrace"


@pytest.fixture(scope="module")
def stack_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Model, CLT, and a fingerprint of SHELL fitted on reference signatures; plus one shell prompt the
    fingerprint flags offline (the live path must flag it too)."""
    need_vllm()
    home = tmp_path_factory.mktemp("stack")
    model = tiny_vllm_model(home)
    clt_dir = tiny_vllm_clt(home / "clt")
    hf, tok = load_hf(Path(model.path))
    clt = load_clt(clt_dir)
    builder = SignatureBuilder.for_model(hf, clt, k=32, model=model.name)
    gen = GenerationConfig(max_new_tokens=MAX_TOKENS, decode_every=DECODE_EVERY)
    shell = get_shell(SHELL)
    pos_prompts = [i.prompt for i in shell.instances[:24]]
    pos = [analyze_prompt(hf, tok, builder, p, gen).signature for p in pos_prompts]
    neg = [analyze_prompt(hf, tok, builder, c.prompt, gen).signature for c in load_controls()[:48]]
    fp = fit_fingerprint(SHELL, SHELL, pos, neg, clt.cfg.n_features, FitConfig(n_sparse=4))
    flagged = [p for p, s in zip(pos_prompts, pos, strict=True) if fp.matches(s)[1]]
    assert flagged, "the fitted fingerprint flags none of its own family offline"
    fp_path = save_fingerprints(home / "fingerprints.json", [fp])
    return {"home": home, "model": model, "clt": clt_dir, "fingerprints": fp_path, "shell_prompt": flagged[0]}


@pytest.fixture(scope="module")
def stack(stack_setup: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_vllm()
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary on PATH")
    redis_srv = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    redis_srv.start()
    grpc_port, vport = free_port(), free_port()
    home = stack_setup["home"]
    argv, env = vllm_command(str(stack_setup["model"].path), port=vport, clt=str(stack_setup["clt"]),
                             target=f"127.0.0.1:{grpc_port}", dtype="float32", max_model_len=1024,
                             settings={"RESIDUE_SAMPLE_DECODE_EVERY": str(DECODE_EVERY)})  # fmt: skip
    vllm = VllmServer(argv, env, str(home / "vllm.log"), vport).start()
    try:
        # The sidecar is not up yet: serving must not notice.
        early = post(vllm.url + "/v1/completions", _completion(vllm, "The river runs past the old mill"))
        sidecar_env = {"REDIS_URL": redis_srv.url, "RESIDUE_CLT": str(stack_setup["clt"]),
                       "RESIDUE_FINGERPRINTS": str(stack_setup["fingerprints"])}  # fmt: skip
        with serve_sidecar(tmp_path_factory.mktemp("sidecar"), sidecar_env, grpc_port=grpc_port) as side:
            yield {"vllm": vllm, "sidecar": side, "early": early, **stack_setup}
    finally:
        vllm.stop()
        redis_srv.stop()


def _completion(vllm: VllmServer, prompt: str) -> dict[str, Any]:
    name = get(vllm.url + "/v1/models")["data"][0]["id"]
    return {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def _chat(vllm: VllmServer, content: str) -> dict[str, Any]:
    name = get(vllm.url + "/v1/models")["data"][0]["id"]
    return {"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0}  # fmt: skip


def _get_residue(side: SidecarProcess, request_id: str, timeout_s: float = 30.0) -> pb.ResidueRecord:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(side.grpc_target) as ch:
        stub = pb_grpc.ResidueServiceStub(ch)
        while True:
            try:
                rec = stub.GetResidue(pb.GetResidueRequest(request_id=request_id), timeout=5)
                if rec.complete:
                    return rec
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:  # pyright: ignore
                    raise
            if time.monotonic() > deadline:
                raise AssertionError(f"{request_id} never completed")
            time.sleep(0.1)


def test_every_request_is_queryable_by_its_completion_id(stack: dict[str, Any]) -> None:
    """Concurrent completions and chats: each one's residue record is found under the id the OpenAI API
    returned, complete, with the model, the CLT id and its frames; so is the request served while the
    sidecar was down (the plugin held it in its queue)."""
    vllm, side = stack["vllm"], stack["sidecar"]
    bodies = [
        ("/v1/completions", _completion(vllm, p)) for p in ("Seven plus five is", "Alice keeps the key")
    ]
    bodies += [
        ("/v1/chat/completions", _chat(vllm, c)) for c in ("Hello there", "What day is the market closed?")
    ]
    with ThreadPoolExecutor(len(bodies)) as ex:
        resps = list(ex.map(lambda b: post(vllm.url + b[0], b[1]), bodies))
    for resp in [stack["early"], *resps]:
        rec = _get_residue(side, resp["id"])
        assert rec.model == stack["model"].name and rec.clt_id == load_clt(stack["clt"]).clt_id()
        assert rec.output_tokens == resp["usage"]["completion_tokens"]
        assert rec.signature.frame_count >= 2 and len(rec.signature.layers) == 4
        assert rec.finish_reason == pb.FINISH_REASON_LENGTH


def test_shell_prompt_raises_its_fingerprint_flag_live(stack: dict[str, Any]) -> None:
    """A shell prompt sent through vLLM's chat API raises the fingerprint's flag on a WatchFlags stream,
    in the stored record, and in the sidecar's /metrics."""
    vllm, side = stack["vllm"], stack["sidecar"]
    events: list[pb.FlagEvent] = []
    ch = grpc.insecure_channel(side.grpc_target)
    watch = pb_grpc.ResidueServiceStub(ch).WatchFlags(pb.WatchFlagsRequest())

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            events.extend(watch)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    time.sleep(0.5)
    resp = post(vllm.url + "/v1/chat/completions", _chat(vllm, stack["shell_prompt"]))
    rec = _get_residue(side, resp["id"])
    assert any(m.fingerprint == SHELL and m.matched for m in rec.fingerprint_matches), rec.fingerprint_matches
    deadline = time.monotonic() + 10
    while not any(e.request_id == resp["id"] and e.fingerprint == SHELL for e in events):
        assert time.monotonic() < deadline, [(e.request_id, e.fingerprint) for e in events]
        time.sleep(0.1)
    watch.cancel()
    ch.close()
    with urllib.request.urlopen(f"http://{side.metrics_target}/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f'residue_flags_total{{fingerprint="{SHELL}"}}'))
    assert float(line.split()[-1]) >= 1


def test_plugin_to_sidecar_over_tls_with_a_token(stack_setup: dict[str, Any], tmp_path: Path) -> None:
    """A sidecar that requires TLS and a bearer token: the plugin, given the CA file and the token,
    delivers every request; the sidecar's plaintext health port answers probes without either."""
    key, cert = self_signed(tmp_path)
    token = "plugin-s3cret"
    side_env = {"RESIDUE_TLS_CERT": str(cert), "RESIDUE_TLS_KEY": str(key), "RESIDUE_TOKEN": token,
                "RESIDUE_CLT": str(stack_setup["clt"])}  # fmt: skip
    side = SidecarProc(tmp_path, side_env, ca=cert.read_bytes(), token=token)
    side.start()
    vport = free_port()
    settings = {"RESIDUE_TLS_CA": str(cert), "RESIDUE_TOKEN": token}
    argv, env = vllm_command(str(stack_setup["model"].path), port=vport, clt=str(stack_setup["clt"]),
                             target=f"localhost:{side.port}", dtype="float32", max_model_len=1024,
                             settings=settings)  # fmt: skip
    try:
        with VllmServer(argv, env, str(tmp_path / "vllm.log"), vport) as vllm:
            resps = [
                post(vllm.url + "/v1/completions", _completion(vllm, p)) for p in ("Hello", "Seven plus")
            ]
            for r in resps:
                assert side.get_residue(r["id"]).output_tokens == r["usage"]["completion_tokens"]
            st = get(vllm.url + "/residue/status")["workers"][0]["sender"]
            assert st["connects"] >= 1 and st["lost_in_flight"] == 0
    finally:
        side.stop()

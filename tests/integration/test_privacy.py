"""No prompt or output text leaves the model server (DESIGN.md §8): after real traffic with marker
strings in the prompts, neither Redis, nor the sidecar's logs, nor /metrics contain them, and token ids
are stored only for a request that opted in."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from grpc import aio
from prometheus_client import generate_latest

from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.exporter import register_collectors
from residue_monitor.service.frames import request_messages
from residue_monitor.service.server import ServerConfig, Sidecar
from residue_monitor.service.store import RedisStore

from .conftest import RedisServer

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]

MARKERS = ("ZQXJ-PRIVATE-7781", "Marguerite Okonkwo-Lindqvist")
PROMPTS = [
    f"My account code is {MARKERS[0]}. What is the capital of France?",
    f"Write a short note to {MARKERS[1]} about the meeting.",
]


async def test_no_prompt_or_output_text_in_redis_logs_or_metrics(
    tiny_hf: tuple[Any, Any],
    clt: CrossLayerTranscoder,
    fresh_redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every Redis key and value, every log line (DEBUG and up) and the /metrics exposition are free of
    the marker strings and of the generated text; records carry no token ids (not opted in)."""
    model, tok = tiny_hf
    requests = [
        request_messages(model, tok, clt, p, f"priv-{i}", model_name="tiny", max_new_tokens=8)
        for i, p in enumerate(PROMPTS)
    ]
    store = RedisStore.from_url(fresh_redis_server.url)
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, drain_delay_s=0.0, grace_s=1.0,
                       prompt_error_threshold=-1.0)  # fmt: skip  # every request flags: flag stream too
    sidecar = Sidecar(cfg, store=store, clt=clt)
    caplog.set_level(logging.DEBUG)
    await sidecar.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            await stub.Ingest(iter([m for r in requests for m in r]))
            for i in range(len(PROMPTS)):
                rec = await stub.GetResidue(pb.GetResidueRequest(request_id=f"priv-{i}"))
                assert rec.complete and not rec.prompt_token_ids
        register_collectors(sidecar.registry, sidecar.stats.snapshot)
        metrics = generate_latest(sidecar.registry).decode()
    finally:
        await sidecar.stop(grace_s=0.5, drain_delay_s=0.0)
        await store.close()
    raw: Any = redis.Redis.from_url(fresh_redis_server.url)  # bytes replies (no decode_responses)
    dumped = _dump(raw)
    assert b"priv-0" in dumped  # the scan did read the records
    logs = "\n".join(r.getMessage() for r in caplog.records)
    words = [w for p in PROMPTS for w in p.split() if len(w) > 6]  # distinctive prompt words too
    for needle in (*MARKERS, *words):
        assert needle.encode() not in dumped, needle
        assert needle not in logs, needle
        assert needle not in metrics, needle
    # The scan would have seen text had any been stored: a planted value shows up.
    raw.xadd("residue:{planted}:flags", {b"e": MARKERS[0].encode()})
    assert MARKERS[0].encode() in _dump(raw)
    raw.close()


def _dump(raw: Any) -> bytes:
    """Every key and every value in the Redis database, concatenated."""
    out = b""
    for key in raw.scan_iter(count=1000):
        kind = raw.type(key)
        out += key
        if kind == b"string":
            out += raw.get(key) or b""
        elif kind == b"hash":
            out += b"".join(k + v for k, v in raw.hgetall(key).items())
        elif kind == b"zset":
            out += b"".join(m for m, _ in raw.zrange(key, 0, -1, withscores=True))
        elif kind == b"stream":
            out += b"".join(k + v for _, e in raw.xrange(key) for k, v in e.items())
        elif kind == b"set":
            out += b"".join(raw.smembers(key))
    return out

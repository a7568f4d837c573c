"""Hostile input against every RPC of a real sidecar → benchmarks/results/fuzz.json (issue 10).

    python -m benchmarks.fuzz [--messages 100000] [--seed 0]

Generated messages, sent as raw bytes so nothing on the client side can sanitise them:

* mutations of valid messages (real tiny-model frames, whole requests in one IngestBatch, a batch in a
  batch, requests for every RPC): bytes flipped, cut, duplicated, spliced from another message; a varint
  length pointing past the end;
* crafted messages: NaN / inf / negative values in packed arrays and statistics, ids past the transcoder,
  giant repeated fields (100k head entries, 1 MB of feature ids), invalid UTF-8 in string fields, 2 kB
  request ids, page sizes of 2³², page tokens of random bytes (deep pagination), unknown enum values;
* random bytes of random length.

Ingest gets streams of 1–20 messages mixing the above with valid ones. Every call must end with a status
from the documented set (``DOCUMENTED``); UNKNOWN or INTERNAL, a hung call, or a sidecar that stops
answering health checks counts as a failure. The sidecar runs in-process on a fresh MemoryStore.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from residue_monitor.service._proto import residue_pb2 as pb

RESULTS = Path(__file__).parent / "results"
CLIENT_CORE_ERROR = "Internal error from Core"
"""What grpc's aio client reports when one of its stream writes fails because the server already ended
the call (seen on Ingest streams the server rejected mid-way); not a server status."""
SERVICE = "/residue.v1.ResidueService/"
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
}
"""What DESIGN.md §5 and the Trace RPC promise (FAILED_PRECONDITION: Trace off, or a replay of a request
stored without token ids; DEADLINE_EXCEEDED: the client's own deadline, or Trace's time limit)."""


def _mutate(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:  # cut
            del b[rng.randrange(len(b)) :]
        elif op == 2 and b:  # duplicate a slice
            i = rng.randrange(len(b))
            b[i:i] = b[i : i + rng.randint(1, 64)]
        elif op == 3 and others:  # splice another message in
            o = rng.choice(others)
            b[rng.randrange(len(b) + 1) :] = o[rng.randrange(len(o) + 1) :]
        elif op == 4:  # a length-delimited field whose length runs past the end
            b += bytes([0x12]) + bytes([0xFF, 0xFF, 0xFF, 0x0F]) + rng.randbytes(rng.randint(0, 16))
        else:  # invalid UTF-8 in field 1 (a string in every request message here)
            b = bytearray(bytes([0x0A, 4, 0xFF, 0xFE, 0xC0, 0x80])) + b
    return bytes(b)


def _crafted_frames(rng: random.Random, valid_frame: pb.IngestMessage) -> list[pb.IngestMessage]:
    out = []
    for _ in range(4):
        m = pb.IngestMessage()
        m.CopyFrom(valid_frame)
        p = m.frame.packed
        kind = rng.randrange(6)
        if kind == 0:
            vals = bytearray(p.feature_values)
            if vals:
                i = 4 * rng.randrange(len(vals) // 4)
                vals[i : i + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -1.0, 1e30]))
            p.feature_values = bytes(vals)
        elif kind == 1:
            p.feature_ids = struct.pack("<i", rng.choice([-1, 2**31 - 1, 10**6])) * (len(p.feature_ids) // 4)
        elif kind == 2:
            p.head_stats = rng.randbytes(36) * 100_000  # a giant repeated field (3.6 MB)
        elif kind == 3:
            p.layer_stats = struct.pack("<f", float("nan")) * (len(p.layer_stats) // 4)
        elif kind == 4:
            m.frame.request_id = "x" * 2048
        else:
            m.frame.phase = rng.choice([0, 7, 2**20])  # pyright: ignore[reportAttributeAccessIssue]
        out.append(m)
    return out


def corpus(requests: Sequence[Sequence[pb.IngestMessage]]) -> dict[str, list[bytes]]:
    """Valid serialized messages per RPC, the seeds of every mutation."""
    ingest = [m.SerializeToString() for r in requests for m in r]
    # Batches as the plugin sends them (a whole request in one), and a batch holding a batch.
    batches = [pb.IngestMessage(batch=pb.IngestBatch(messages=list(r))) for r in requests]
    ingest += [b.SerializeToString() for b in batches]
    ingest.append(pb.IngestMessage(batch=pb.IngestBatch(messages=batches[:2])).SerializeToString())
    return {
        "Ingest": ingest,
        "GetResidue": [
            pb.GetResidueRequest(request_id=r[0].start.request_id).SerializeToString() for r in requests
        ]
        + [pb.GetResidueRequest(request_id="nope", tenant="other").SerializeToString()],
        "QueryResidues": [
            pb.QueryResiduesRequest(page_size=10, flagged_only=True, model="tiny").SerializeToString(),
            pb.QueryResiduesRequest(
                page_size=2**32 - 1, page_token="A" * 200, fingerprint="x"
            ).SerializeToString(),
            pb.QueryResiduesRequest(min_score=float("nan")).SerializeToString(),
        ],
        "WatchFlags": [
            pb.WatchFlagsRequest(after_event_id="0-0").SerializeToString(),
            pb.WatchFlagsRequest(after_event_id="9" * 100, tenant="t").SerializeToString(),
        ],
        "ListFingerprints": [pb.ListFingerprintsRequest(model="tiny").SerializeToString()],
        "Trace": [
            pb.TraceRequest(prompt="hi").SerializeToString(),
            pb.TraceRequest(request_id="x", node_threshold=float("nan")).SerializeToString(),
        ],
    }


def gen(rng: random.Random, seeds: dict[str, list[bytes]], frames: list[pb.IngestMessage]) -> tuple[str, Any]:
    """One fuzz case: (method, bytes) or ("Ingest", [bytes, …])."""
    method = rng.choice(list(seeds))
    pool = seeds[method]

    def one() -> bytes:
        r = rng.random()
        if r < 0.15:
            return rng.choice(pool)
        if r < 0.75:
            return _mutate(rng, rng.choice(pool), pool)
        if r < 0.9 and method == "Ingest":
            return rng.choice(_crafted_frames(rng, rng.choice(frames))).SerializeToString()
        return rng.randbytes(rng.choice([0, 1, 7, 64, 4096]))

    if method == "Ingest":
        return method, [one() for _ in range(rng.randint(1, 20))]
    return method, one()


async def call(
    ch: aio.Channel, method: str, payload: Any, timeout_s: float = 10.0
) -> tuple[grpc.StatusCode, str]:
    """Send raw bytes to one method; the status it ended with and its details."""
    ident = lambda b: b  # noqa: E731  # raw bytes in and out
    try:
        if method == "Ingest":
            # Write message by message and stop once the server has answered (it may reject the stream
            # at any message); the status is then the server's, not a failed client write's.
            stream = ch.stream_unary(SERVICE + method, ident, ident)(timeout=timeout_s)
            for m in payload:
                if stream.done():
                    break
                with contextlib.suppress(aio.AioRpcError, aio.UsageError, RuntimeError):
                    await stream.write(m)
            if not stream.done():
                with contextlib.suppress(aio.AioRpcError, aio.UsageError, RuntimeError):
                    await stream.done_writing()
            await stream
        elif method == "WatchFlags":
            stream = ch.unary_stream(SERVICE + method, ident, ident)(payload, timeout=0.3)
            async for _ in stream:
                pass
        else:
            await ch.unary_unary(SERVICE + method, ident, ident)(payload, timeout=timeout_s)
    except aio.AioRpcError as e:
        code = e.code()
        # A watch that is still open when its short deadline hits is healthy, not a hang.
        if method == "WatchFlags" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return grpc.StatusCode.OK, ""
        return code, e.details() or ""
    return grpc.StatusCode.OK, ""


async def run(target: str, cases: int, seed: int, requests: Sequence[Sequence[pb.IngestMessage]],
              concurrency: int = 8) -> dict[str, Any]:  # fmt: skip
    """Fuzz ``target`` with ``cases`` generated calls; counts of statuses per method and every failure."""
    rng = random.Random(seed)
    seeds = corpus(requests)
    frames = [m for r in requests for m in r if m.WhichOneof("kind") == "frame"]
    by_method: dict[str, Counter[str]] = {}
    failures: list[str] = []
    messages = 0
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with aio.insecure_channel(target, options=opts) as ch:
        sem = asyncio.Semaphore(concurrency)

        async def one(method: str, payload: Any) -> None:
            async with sem:
                code, details = await call(ch, method, payload)
            if code == grpc.StatusCode.INTERNAL and details == CLIENT_CORE_ERROR:
                # The client's own core failing a write after the server had already answered the stream
                # (the server's status is lost to the client); the server side is checked by its log.
                by_method.setdefault(method, Counter())["client_write_race"] += 1
                return
            by_method.setdefault(method, Counter())[code.name] += 1
            if code not in DOCUMENTED:
                failures.append(f"{method}: {code.name}: {details[:200]}")

        batch: list[asyncio.Task[None]] = []
        for _ in range(cases):
            method, payload = gen(rng, seeds, frames)
            messages += len(payload) if isinstance(payload, list) else 1
            batch.append(asyncio.ensure_future(one(method, payload)))
            if len(batch) >= 256:
                await asyncio.gather(*batch)
                batch.clear()
        await asyncio.gather(*batch)
    return {"calls": cases, "messages": messages, "failures": failures,
            "statuses": {m: dict(c) for m, c in sorted(by_method.items())}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--messages", type=int, default=100_000, help="messages to generate (Ingest streams count each)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return asyncio.run(_main(args.messages, args.seed))


async def _main(n_messages: int, seed: int) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from residue_monitor.detectors.clt.model import CLTConfig, random_clt
    from residue_monitor.service.frames import request_messages
    from residue_monitor.service.models import build_tiny_llama, load_hf
    from residue_monitor.service.server import ServerConfig, Sidecar
    from residue_monitor.service.store import MemoryStore
    from residue_monitor.service.training import machine_info, write_json

    model, tok = load_hf(build_tiny_llama().path)
    clt = random_clt(CLTConfig(n_layers=4, d_model=64, n_features=256, k=16), seed=1, scale=0.5)
    requests = [request_messages(model, tok, clt, p, f"req-{i}", model_name="tiny", max_new_tokens=10)
                for i, p in enumerate(["Hello there", "Where is the key?", "Count to five."])]  # fmt: skip
    sidecar = Sidecar(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_s=1.0, drain_delay_s=0.0),
                      store=MemoryStore(), clt=clt)  # fmt: skip
    await sidecar.start()
    t0 = time.time()
    total: dict[str, Any] = {"calls": 0, "messages": 0, "failures": [], "statuses": {}}
    chunk = 0
    while total["messages"] < n_messages:
        r = await run(f"127.0.0.1:{sidecar.port}", 2000, seed + chunk, requests)
        chunk += 1
        total["calls"] += r["calls"]
        total["messages"] += r["messages"]
        total["failures"] += r["failures"]
        for m, c in r["statuses"].items():
            agg = total["statuses"].setdefault(m, {})
            for k, v in c.items():
                agg[k] = agg.get(k, 0) + v
        print(f"{total['messages']:>8} messages, {len(total['failures'])} failures", flush=True)
    async with aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
        ok = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())  # type: ignore[arg-type]
    await sidecar.stop()
    total |= {"alive_after": ok.status == health_pb2.HealthCheckResponse.SERVING, "seed": seed,
              "run_seconds": round(time.time() - t0, 1), "machine": machine_info(),
              "failures": total["failures"][:50], "failure_count": len(total["failures"])}  # fmt: skip
    write_json(RESULTS / "fuzz.json", total)
    print(f"{total['messages']} messages in {total['calls']} calls: {total['failure_count']} undocumented "
          f"statuses; sidecar alive: {total['alive_after']}")  # fmt: skip
    return 0 if total["failure_count"] == 0 and total["alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())

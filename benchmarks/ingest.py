"""Sidecar ingest throughput, GetResidue latency and Redis memory per record, through the real gRPC
server and RedisStore → benchmarks/results/ingest.json.

    python -m benchmarks.ingest [--frames 200000] [--records 100000] [--redis-url URL] [--heads]
                                [--fingerprints FILE] [--per-layer] [--batch 64]

Frames are SmolLM2-sized (30 layers × top-32 of 1536 features, 8 frames a request: PROMPT_LAST, 6 DECODE,
FINAL) with synthetic but well-formed values; ``--heads`` adds 9 HeadStats per layer as the plugin will.
The load comes from a separate client process over loopback, sending pre-serialized messages on one
Ingest stream (one plugin worker), ``--batch`` of them to an IngestBatch as the plugin's sender sends what
has queued up under load (``--batch 1``: one stream message each). Redis is the local one on
127.0.0.1:6379 when it answers, else a private redis-server; everything is written under a throw-away
tenant that is deleted afterwards.
GetResidue latency is measured sequentially, from the client process, over ``--records`` stored records.
Every request is scored as in production: the residue detectors, ``prompt_error_ratio`` and the
fingerprints of ``--fingerprints`` (default: the SmolLM2 fingerprints ``residue shells run`` wrote, when
they exist); the frames then carry those fingerprints' CLT id so that every fingerprint applies.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
N_LAYERS, K, N_FEATURES, N_HEADS = 30, 32, 1536, 9
FRAMES_PER_REQUEST = 8
INGEST = "/residue.v1.ResidueService/Ingest"
GET = "/residue.v1.ResidueService/GetResidue"


def synthetic_request(
    rid: str, tenant: str, rng: np.random.Generator, heads: bool, clt_id: str = "bench", packed: bool = True
) -> list[bytes]:
    """Serialized IngestMessages of one request with SmolLM2-shaped frames (PackedResidue, as the plugin
    sends them, or per-layer LayerResidue messages)."""
    from residue_monitor.service._proto import residue_pb2 as pb
    from residue_monitor.service.frames import frame_message, pack_ids, pack_values

    start = pb.RequestStart(request_id=rid, model="SmolLM2-135M-Instruct", clt_id=clt_id, tenant=tenant,
                            prompt_tokens=120)  # fmt: skip
    start.start_time.FromNanoseconds(time.time_ns())
    msgs = [pb.IngestMessage(start=start)]
    phases = ["prompt_last"] + ["decode"] * (FRAMES_PER_REQUEST - 2) + ["final"]
    for seq, phase in enumerate(phases):
        layers = []
        for layer in range(N_LAYERS):
            ids = rng.choice(N_FEATURES, K, replace=False)
            vals = np.sort(rng.gamma(2.0, 1.5, K))[::-1]
            layers.append(
                pb.LayerResidue(layer=layer, feature_ids=pack_ids(ids), feature_values=pack_values(vals),
                                l0=K, mass=float(vals.sum()), error_ratio=float(rng.uniform(0.3, 0.9)),
                                in_norm=float(rng.uniform(5, 50)), out_norm=float(rng.uniform(1, 20)))
            )  # fmt: skip
        hs = []
        if heads:
            for layer in range(N_LAYERS):
                for h in range(N_HEADS):
                    f = rng.dirichlet([1, 1, 1, 1])
                    hs.append(pb.HeadStats(layer=layer, head=h, entropy=float(rng.uniform(0.5, 4)),
                                           self_frac=f[0], local_frac=f[1], sink_frac=f[2], top_span_start=3,
                                           top_span_len=4, top_span_mass=f[3]))  # fmt: skip
        logits = pb.LogitStats(entropy=2.0, top1_prob=0.4, margin=0.1, eos_prob=0.01)
        if packed:
            body = _pack(layers, hs)
            msgs.append(frame_message(rid, 119 + seq * 16, phase, seq, body, logits))  # type: ignore[arg-type]
        else:
            msgs.append(frame_message(rid, 119 + seq * 16, phase, seq, layers, logits, hs))  # type: ignore[arg-type]
    end = pb.RequestEnd(
        request_id=rid, finish_reason=pb.FINISH_REASON_STOP, prompt_tokens=120, output_tokens=100
    )
    end.end_time.FromNanoseconds(time.time_ns())
    msgs.append(pb.IngestMessage(end=end))
    return [m.SerializeToString() for m in msgs]


def _pack(layers: list[Any], heads: list[Any]) -> Any:
    """The same numbers as a PackedResidue."""
    from residue_monitor.service._proto import residue_pb2 as pb

    stats = [(x.error_ratio, x.l0, x.mass, x.in_norm, x.out_norm, x.unreached) for x in layers]
    hs = [(x.layer, x.head, x.entropy, x.self_frac, x.local_frac, x.sink_frac, x.top_span_start,
           x.top_span_len, x.top_span_mass) for x in heads]  # fmt: skip
    return pb.PackedResidue(
        layer_ids=np.array([x.layer for x in layers], dtype="<i4").tobytes(),
        feature_counts=np.array([len(x.feature_ids) // 4 for x in layers], dtype="<i4").tobytes(),
        feature_ids=b"".join(x.feature_ids for x in layers),
        feature_values=b"".join(x.feature_values for x in layers),
        layer_stats=np.array(stats, dtype="<f4").tobytes(),
        head_stats=np.array(hs, dtype="<f4").tobytes() if hs else b"",
    )


def _ingest_client(
    addr: str, n_requests: int, tenant: str, heads: bool, clt_id: str, packed: bool, batch: int, out: Any
) -> None:
    """Client process: build the messages, then time one Ingest stream carrying all of them, ``batch`` to a
    stream message (an IngestBatch, as the plugin's sender sends what is pending; 1: one by one)."""
    import grpc

    from residue_monitor.service._proto import residue_pb2 as pb

    rng = np.random.default_rng(0)
    template = [synthetic_request(f"t{i}", tenant, rng, heads, clt_id, packed) for i in range(16)]
    msgs: list[bytes] = []
    for i in range(n_requests):
        msgs += _renamed(template[i % len(template)], f"bench-{i}")
    n_messages = len(msgs)
    if batch > 1:
        msgs = [_batched(msgs[i : i + batch]) for i in range(0, len(msgs), batch)]
    with grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        ingest = ch.stream_unary(
            INGEST, request_serializer=None, response_deserializer=pb.IngestSummary.FromString
        )
        t0 = time.perf_counter()
        summary = ingest(iter(msgs))
        elapsed = time.perf_counter() - t0
    out.put((elapsed, summary.frames_accepted, summary.requests_ended, sum(map(len, msgs)) / n_messages))


def _batched(raw: list[bytes]) -> bytes:
    """Serialized messages as one serialized IngestMessage(batch=…) (built before the clock starts)."""
    from residue_monitor.service._proto import residue_pb2 as pb

    batch = pb.IngestBatch(messages=[pb.IngestMessage.FromString(m) for m in raw])
    return pb.IngestMessage(batch=batch).SerializeToString()


def _renamed(request: list[bytes], rid: str) -> list[bytes]:
    from residue_monitor.service._proto import residue_pb2 as pb

    out = []
    for raw in request:
        m = pb.IngestMessage.FromString(raw)
        getattr(m, m.WhichOneof("kind")).request_id = rid  # type: ignore[arg-type]
        out.append(m.SerializeToString())
    return out


def _get_client(addr: str, ids: list[str], tenant: str, n_calls: int, out: Any) -> None:
    """Client process: sequential GetResidue calls on random stored ids; latencies in ms."""
    import grpc

    from residue_monitor.service._proto import residue_pb2 as pb

    rng = np.random.default_rng(1)
    reqs = [pb.GetResidueRequest(request_id=ids[int(i)], tenant=tenant).SerializeToString()
            for i in rng.integers(0, len(ids), n_calls + 100)]  # fmt: skip
    with grpc.insecure_channel(addr) as ch:
        get = ch.unary_unary(GET, request_serializer=None, response_deserializer=None)
        times = []
        for i, r in enumerate(reqs):
            t0 = time.perf_counter()
            get(r)
            if i >= 100:  # warm-up
                times.append((time.perf_counter() - t0) * 1e3)
    out.put(times)


def _run_client(target: Any, *args: Any) -> Any:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def _redis_url(arg: str) -> tuple[str, subprocess.Popen[bytes] | None]:
    """``arg``, else the local Redis if it answers, else a private redis-server (returned to stop)."""
    import redis

    if arg:
        return arg, None
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_timeout=0.5).ping()
        return "redis://127.0.0.1:6379/0", None
    except redis.RedisError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no Redis on 127.0.0.1:6379 and no redis-server binary: pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", tempfile.mkdtemp()], stdout=subprocess.DEVNULL)  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc


async def _bench(args: argparse.Namespace, url: str, tenant: str) -> dict[str, Any]:
    import redis

    from residue_monitor.service._proto import residue_pb2 as pb
    from residue_monitor.service.server import ServerConfig, Sidecar
    from residue_monitor.service.store import RedisStore
    from residue_monitor.shells.fingerprint import load_fingerprints

    store = RedisStore.from_url(url, backlog_max=max(args.records, 10_000))
    fps = load_fingerprints(args.fingerprints) if args.fingerprints else []
    clt_id = fps[0].clt_id if fps else "bench"
    cfg = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=-1, drain_delay_s=0.0, max_message_bytes=16 << 20,
        fingerprints_path=str(args.fingerprints or ""),
    )  # fmt: skip
    sidecar = Sidecar(cfg, store=store)
    await sidecar.start()
    addr = f"127.0.0.1:{sidecar.port}"
    n_requests = max(1, args.frames // FRAMES_PER_REQUEST)
    try:
        elapsed, frames, ended, msg_bytes = await asyncio.to_thread(
            _run_client, _ingest_client, addr, n_requests, tenant, args.heads, clt_id, not args.per_layer,
            args.batch,
        )  # fmt: skip
        assert ended == n_requests, (ended, n_requests)
        template = await store.get_record("bench-0", tenant)
        ids = [f"bench-{i}" for i in range(n_requests)]
        t_fill = time.perf_counter()
        for lo in range(n_requests, args.records, 32):  # 32 writes in flight
            batch = []
            for i in range(lo, min(lo + 32, args.records)):
                r = pb.ResidueRecord()
                r.CopyFrom(template)
                r.request_id = f"fill-{i}"
                r.start_time.FromNanoseconds(time.time_ns() - i * 1000)
                batch.append(store.put_record(r))
                ids.append(r.request_id)
            await asyncio.gather(*batch)
        fill_s = time.perf_counter() - t_fill
        lat = await asyncio.to_thread(_run_client, _get_client, addr, ids, tenant, args.calls)
        sync = redis.Redis.from_url(url)
        sample = [ids[i] for i in np.random.default_rng(2).integers(0, len(ids), 200)]
        rec_bytes = [sync.memory_usage(f"residue:{{{tenant}}}:req:{rid}") or 0 for rid in sample]
        idx_keys = list(sync.scan_iter(match=f"residue:{{{tenant}}}:idx:*", count=1000))
        idx_bytes = sum(sync.memory_usage(k) or 0 for k in idx_keys)
        sync.close()
    finally:
        await sidecar.stop(grace_s=1.0, drain_delay_s=0.0)
        await store.close()
    return {
        "frames_per_second": frames / elapsed,
        "requests_per_second": n_requests / elapsed,
        "get_residue_p50_ms": statistics.median(lat),
        "get_residue_p99_ms": float(np.percentile(lat, 99)),
        "bytes_per_record": float(np.mean(rec_bytes)),
        "index_bytes_per_record": idx_bytes / len(ids),
        "frames": frames,
        "frame_bytes": msg_bytes,
        "heads_per_frame": N_HEADS * N_LAYERS if args.heads else 0,
        "records_stored": len(ids),
        "get_residue_calls": len(lat),
        "fill_records_per_second": (len(ids) - n_requests) / fill_s if len(ids) > n_requests else None,
        "frame_shape": {"layers": N_LAYERS, "top_k": K, "n_features": N_FEATURES},
        "redis": url.rsplit("@", maxsplit=1)[-1],
        "scorers": list(sidecar.scorers.names()),
        "frame_form": "per-layer LayerResidue" if args.per_layer else "PackedResidue",
        "messages_per_batch": args.batch,
        "fingerprints": len(fps),
    }


def _default_fingerprints() -> Path | None:
    from residue_monitor.service.models import residue_home

    found = sorted((residue_home() / "fingerprints").glob("SmolLM2-*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _cleanup(url: str, tenant: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"residue:{{{tenant}}}:*", count=5000))
    for lo in range(0, len(keys), 5000):
        client.unlink(*keys[lo : lo + 5000])
    client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200_000, help="frames to ingest")
    ap.add_argument("--records", type=int, default=100_000, help="records stored for the latency test")
    ap.add_argument("--calls", type=int, default=2000, help="GetResidue calls timed")
    ap.add_argument("--heads", action="store_true", help="also send 270 HeadStats per frame")
    ap.add_argument("--redis-url", default="", help="default: 127.0.0.1:6379 if it answers, else private")
    ap.add_argument("--per-layer", action="store_true", help="send LayerResidue messages, not PackedResidue")
    ap.add_argument("--fingerprints", type=Path, default=None, help="default: SmolLM2's, when present")
    ap.add_argument(
        "--batch", type=int, default=64, help="messages per IngestBatch (the plugin's SEND_BATCH); 1: none"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    args = ap.parse_args(argv)
    if args.fingerprints is None:
        args.fingerprints = _default_fingerprints()
    from residue_monitor.service.training import machine_info, write_json

    url, proc = _redis_url(args.redis_url)
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        result = asyncio.run(_bench(args, url, tenant))
    finally:
        _cleanup(url, tenant)
        if proc is not None:
            proc.kill()
            proc.wait()
    result["machine"] = machine_info()
    write_json(args.out, result)
    r = result
    print(
        f"ingest: {r['frames_per_second']:,.0f} frames/s ({r['frame_bytes'] / 1024:.1f} KiB each), "
        f"GetResidue p50 {r['get_residue_p50_ms']:.2f} ms p99 {r['get_residue_p99_ms']:.2f} ms over "
        f"{r['records_stored']:,} records, {r['bytes_per_record']:,.0f} B/record in Redis → {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Faults and a soak with the real processes → benchmarks/results/faults.json and soak.json (issue 10).

    python -m benchmarks.faults [--soak-seconds 600] [--fault-seconds 6] [--soak-only] [--soak-baseline]

vLLM with the plugin (tiny model, fp32), ``residue serve`` and a persistent ``redis-server`` (append-only
file, as deploy/ configures it), as separate processes. The four faults of
``tests/integration/test_vllm_faults.py`` run under load, counted instead of asserted: the sidecar killed
and restarted, Redis killed and restarted, the sidecar stalled (SIGSTOP) until the plugin's queue
overflows, vLLM restarted. Per fault: requests sent, requests that failed, outputs that differ from the
model's greedy output without any monitor (HF reference), and records lost: requests whose record is not
complete after recovery among those stored before the fault, those sent after it, and those in flight
during it, *except* in flight during a sidecar crash (what it had assembled in memory dies with it) or a
stall (the plugin drops by design, counted in ``residue_frames_dropped_total``): those are reported as
``in_flight_incomplete_by_design``.

The soak then sends batches of concurrent requests for ``--soak-seconds`` as fast as vLLM answers them,
samples the resident memory of the sidecar and of vLLM's processes (the plugin lives in the engine core)
every few seconds, and checks that every request has a complete record afterwards. ``--soak-baseline``
first soaks a vLLM without the plugin for as long, under the same load: vLLM's memory grows by itself
(allocator, caches), and only the difference is the plugin's.

The process helpers are the integration tests' (``tests/integration``); run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil

from residue_monitor.detectors.capture import generate_and_capture
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.models import load_hf
from residue_monitor.service.plugin.launch import VllmServer, vllm_command
from residue_monitor.service.training import machine_info, write_json
from tests.integration.conftest import RedisServer
from tests.integration.vllm_fixtures import SidecarProc, free_port, get, post, tiny_vllm_clt, tiny_vllm_model

RESULTS = Path(__file__).parent / "results"
MAX_TOKENS = 24
N_PROMPTS = 12
QUEUE = 256


class Stack:
    """The three processes, the prompts and their unmonitored greedy outputs."""

    def __init__(self, home: Path, capture: bool = True) -> None:
        self.capture = capture
        """Whether vLLM runs with the plugin (False: the baseline soak, no monitor)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH (Debian package redis-server)")
        model = tiny_vllm_model(home)
        clt = tiny_vllm_clt(home / "clt")
        hf, _ = load_hf(Path(model.path))
        rng = random.Random(7)
        self.prompts = [
            [rng.randrange(5, 500) for _ in range(rng.randrange(4, 40))] for _ in range(N_PROMPTS)
        ]
        eos = int(hf.config.eos_token_id)
        self.expected = {
            tuple(p): generate_and_capture(hf, p, MAX_TOKENS, eos_ids=[eos])[0] for p in self.prompts
        }
        self.redis = RedisServer(binary, home, appendonly=True)
        self.redis.start()
        self.sidecar = SidecarProc(home, {"REDIS_URL": self.redis.url, "RESIDUE_CLT": str(clt)}).start()
        port = free_port()
        argv, env = vllm_command(
            str(model.path),
            port=port,
            clt=str(clt),
            target=self.sidecar.target,
            capture=capture,
            dtype="float32",
            max_model_len=512,
            settings={"RESIDUE_QUEUE_SIZE": str(QUEUE)},
        )
        self.vllm = VllmServer(argv, env, str(home / "vllm.log"), port).start()
        self.model = get(self.vllm.url + "/v1/models")["data"][0]["id"]

    def stop(self) -> None:
        self.vllm.stop()
        self.sidecar.stop()
        self.redis.stop()

    def batch(self) -> list[tuple[str, tuple[int, ...], list[int] | None, str]]:
        """Every prompt once, concurrently: (id, prompt, tokens or None, error)."""

        def one(p: list[int]) -> tuple[str, tuple[int, ...], list[int] | None, str]:
            body = {
                "model": self.model,
                "prompt": p,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "return_token_ids": True,
            }
            try:
                r = post(self.vllm.url + "/v1/completions", body, timeout_s=120)
                return r["id"], tuple(p), r["choices"][0]["token_ids"], ""
            except Exception as e:  # counted as a failed request
                return "", tuple(p), None, f"{type(e).__name__}: {e}"

        with ThreadPoolExecutor(len(self.prompts)) as ex:
            return list(ex.map(one, self.prompts))

    def drained(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            snd = get(self.vllm.url + "/residue/status")["workers"][0]["sender"]
            if snd["messages_sent"] == snd["queued"]:
                return
            time.sleep(0.5)

    def complete(self, rid: str, timeout_s: float = 60.0) -> bool:
        """Whether ``rid`` has a complete record, waiting up to ``timeout_s`` for frames on their way."""
        try:
            return self.sidecar.get_residue(rid, timeout_s=timeout_s).complete
        except AssertionError:
            return False

    def complete_now(self, rids: list[str]) -> int:
        """How many of ``rids`` have a complete record right now (one GetResidue each, no waiting)."""
        n = 0
        with self.sidecar.channel() as ch:
            stub = pb_grpc.ResidueServiceStub(ch)
            for rid in rids:
                with contextlib.suppress(grpc.RpcError):  # NOT_FOUND: not complete
                    n += stub.GetResidue(pb.GetResidueRequest(request_id=rid), timeout=10).complete
        return n


class Load:
    """Batches until stopped (``pause`` between batches), collecting every result."""

    def __init__(self, stack: Stack, pause_s: float = 0.2) -> None:
        self.stack, self.pause_s = stack, pause_s
        self.results: list[tuple[str, tuple[int, ...], list[int] | None, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.extend(self.stack.batch())
            self._stop.wait(self.pause_s)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(180)


def _fault(
    stack: Stack,
    name: str,
    inject: Any,
    fault_s: float,
    drops_by_design: bool = False,
    under_load: bool = True,
) -> dict[str, Any]:
    """Records before, the fault (under load, or before it for a vLLM restart: requests to a server that is
    down fail whatever the monitor does), records after; counts instead of asserting."""
    before = [r for r in stack.batch() if not r[3]]
    stack.drained()
    if not under_load:
        inject()
    with Load(stack) as load:
        time.sleep(fault_s / 3)
        if under_load:
            inject()
        time.sleep(fault_s / 3)
    stack.drained()
    after = stack.batch()  # monitored again?
    sent = load.results + after
    failed = [r for r in sent if r[3]]
    changed = [r for r in sent if r[2] is not None and r[2] != stack.expected[r[1]]]
    must_exist = [r[0] for r in before + after] + (
        [] if drops_by_design else [r[0] for r in load.results if not r[3]]
    )
    lost = [rid for rid in must_exist if rid and not stack.complete(rid)]
    # Requests in flight during a fault whose frames are lost by design (a crashed sidecar loses what it
    # had assembled in memory; a stalled one makes the plugin drop): counted, not required.
    in_flight = [r[0] for r in load.results if not r[3]] if drops_by_design else []
    in_flight_incomplete = len(in_flight) - stack.complete_now(in_flight)
    return {
        "fault": name,
        "requests": len(sent),
        "requests_failed": len(failed),
        "outputs_changed": len(changed),
        "records_checked": len(must_exist),
        "records_lost": len(lost),
        "in_flight_incomplete_by_design": in_flight_incomplete,
        "in_flight": len(in_flight),
        "errors": sorted({e for *_, e in failed})[:3],
    }


def _stall(stack: Stack, limit_s: float = 60.0) -> None:
    """SIGSTOP the sidecar until the plugin's queue overflows (gRPC's flow-control windows absorb the first
    few hundred kB), then a second more, then SIGCONT."""
    url = stack.vllm.url + "/residue/status"
    start = get(url)["workers"][0]["sender"]["dropped_queue_full"]
    stack.sidecar.pause()
    t0 = time.monotonic()
    try:
        while (
            get(url)["workers"][0]["sender"]["dropped_queue_full"] == start
            and time.monotonic() - t0 < limit_s
        ):
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stack.sidecar.resume()


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            total += proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    return total / 2**20


def soak(stack: Stack, seconds: float) -> dict[str, Any]:
    """Load for ``seconds``; memory samples, and (with the plugin) the records checked afterwards."""
    assert stack.vllm.proc is not None and stack.sidecar.proc is not None
    samples: list[tuple[float, float, float]] = []
    t0 = time.monotonic()
    with Load(stack, pause_s=0.0) as load:
        while time.monotonic() - t0 < seconds:
            samples.append(
                (time.monotonic() - t0, _rss_mib([stack.sidecar.proc.pid]), _rss_mib([stack.vllm.proc.pid]))
            )
            time.sleep(5)
    elapsed = time.monotonic() - t0
    ok = [r for r in load.results if not r[3]]
    lost_n, dropped = None, None
    if stack.capture:
        stack.drained()
        time.sleep(5.0)  # the last ends settle
        lost_n = len(ok) - stack.complete_now([r[0] for r in ok])
        dropped = get(stack.vllm.url + "/residue/status")["workers"][0]["sender"]["dropped_queue_full"]
    third = max(1, len(samples) // 3)

    def growth(i: int) -> float:  # mean of the last third minus mean of the first third, MiB
        return statistics.mean(s[i] for s in samples[-third:]) - statistics.mean(
            s[i] for s in samples[:third]
        )

    return {
        "seconds": round(elapsed, 1),
        "requests": len(load.results),
        "requests_failed": len(load.results) - len(ok),
        "requests_per_s": round(len(load.results) / elapsed, 2),
        "tokens_per_s": round(sum(len(r[2] or []) for r in ok) / elapsed, 1),
        "records_lost": lost_n,
        "sidecar_rss_mib": {
            "first": round(samples[0][1], 1),
            "max": round(max(s[1] for s in samples), 1),
            "last": round(samples[-1][1], 1),
            "growth_last_vs_first_third": round(growth(1), 1),
        },
        "vllm_rss_mib": {
            "first": round(samples[0][2], 1),
            "max": round(max(s[2] for s in samples), 1),
            "last": round(samples[-1][2], 1),
            "growth_last_vs_first_third": round(growth(2), 1),
        },
        "plugin_dropped_queue_full": dropped,
        "concurrency": N_PROMPTS,
        "max_tokens": MAX_TOKENS,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fault-seconds", type=float, default=6.0)
    ap.add_argument("--soak-seconds", type=float, default=600.0)
    ap.add_argument("--soak-only", action="store_true", help="skip the faults (faults.json is left as is)")
    ap.add_argument(
        "--soak-baseline",
        action="store_true",
        help="first soak vLLM without the plugin for as long (its memory growth is vLLM's own)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    baseline = None
    if args.soak_baseline and args.soak_seconds > 0:
        home = Path(tempfile.mkdtemp(prefix="residue-soak-off-"))
        stack = Stack(home, capture=False)
        try:
            baseline = soak(stack, args.soak_seconds)
            print("baseline (no plugin):", baseline)
        finally:
            stack.stop()
            shutil.rmtree(home, ignore_errors=True)
    home = Path(tempfile.mkdtemp(prefix="residue-faults-"))
    stack = Stack(home)
    try:
        if not args.soak_only:
            faults(stack, args)
        if args.soak_seconds > 0:
            s = {**soak(stack, args.soak_seconds), "machine": machine_info()}
            if baseline is not None:
                s["baseline_without_plugin"] = baseline
                g_on, g_off = (x["vllm_rss_mib"]["growth_last_vs_first_third"] for x in (s, baseline))
                s["vllm_rss_growth_due_to_plugin_mib"] = round(g_on - g_off, 1)
                s["vllm_rss_last_on_minus_off_mib"] = round(
                    s["vllm_rss_mib"]["last"] - baseline["vllm_rss_mib"]["last"], 1
                )
            write_json(args.out / "soak.json", s)
            print({k: v for k, v in s.items() if k != "machine"}, "→", args.out / "soak.json")
    finally:
        stack.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


def faults(stack: Stack, args: argparse.Namespace) -> None:
    """The four faults → faults.json."""
    done = [
        _fault(
            stack,
            "sidecar_killed_and_restarted",
            lambda: (stack.sidecar.kill(), time.sleep(2.0), stack.sidecar.start(timeout_s=600)),
            args.fault_seconds,
            drops_by_design=True,
        ),
        _fault(
            stack,
            "redis_killed_and_restarted",
            lambda: (stack.redis.stop(), time.sleep(2.0), stack.redis.start()),
            args.fault_seconds,
        ),
        _fault(
            stack,
            "sidecar_stalled_until_the_plugin_queue_overflows",
            lambda: _stall(stack),
            args.fault_seconds,
            drops_by_design=True,
        ),
        _fault(
            stack,
            "vllm_restarted",
            lambda: (stack.vllm.stop(), stack.vllm.start()),
            args.fault_seconds,
            under_load=False,
        ),
    ]
    result = {
        "faults_run": len(done),
        "requests_failed": sum(f["requests_failed"] for f in done),
        "outputs_changed": sum(f["outputs_changed"] for f in done),
        "records_lost": sum(f["records_lost"] for f in done),
        "faults": done,
        "machine": machine_info(),
    }
    write_json(args.out / "faults.json", result)
    print({k: v for k, v in result.items() if k not in ("faults", "machine")}, "→", args.out / "faults.json")


if __name__ == "__main__":
    sys.exit(main())

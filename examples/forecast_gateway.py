"""A gateway that acts on residue-monitor's prefill failure forecast: copy it, adapt the policy.

The sidecar scores every request from the residue of its last prompt token as soon as prefill ends, and
answers ``GetResidue(request_id)`` with a provisional record whose ``prefill_forecast`` holds a calibrated
failure probability (or the reason there is none) while the request is still generating. The request id
is the ``id`` of vLLM's streamed chunks (``cmpl-…`` / ``chatcmpl-…``), so a gateway can

1. stream the completion from vLLM's OpenAI API (``/v1/completions`` or ``/v1/chat/completions``),
2. read the request id from the first chunk and ask the sidecar for the forecast, once: ``GetResidue``
   with ``wait_ms`` (the sidecar answers the moment the forecast is stored, or NOT_FOUND at
   ``deadline_s``; chunks are held, not forwarded, meanwhile),
3. pass the stream through, or, when the forecast crosses the threshold, **abort** (close the HTTP
   connection: vLLM aborts the request and stops generating) or **reroute** (hand the request to a
   fallback: a larger model, retrieval, a human).

No forecast (NOT_FOUND until the deadline, an ``unavailable_reason``, a sidecar error) means *pass
through*: the gateway never guesses a score.

Only the standard library (``http.client``), ``grpcio`` and the generated stubs are needed. Usage::

    # one request through the gateway (abort when the artifact flags it)
    python examples/forecast_gateway.py --base-url http://127.0.0.1:8000 --sidecar 127.0.0.1:50051 \\
        --prompt "Who wrote The Tin Drum?" --chat

    # a labelled set (``residue eval-data`` JSONL) through the live stack: every generation finishes,
    # then failures caught / correct answers lost / tokens saved at 1 % and 5 % FPR
    python examples/forecast_gateway.py --base-url http://127.0.0.1:8000 --sidecar 127.0.0.1:50051 \\
        --items items.jsonl --out gateway-report.json

The sidecar's bearer token is read from ``--token`` or ``RESIDUE_TOKEN``; ``--ca`` gives the PEM root for
a TLS sidecar. The pure parts (``Forecast``, ``Policy``, ``decide``, ``threshold_at_fpr``,
``evaluate_policy``, ``policy_report``) need no server and are what to change for another policy.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import grpc

from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc

Action = Literal["abort", "reroute", "observe"]
"""What to do with a request whose forecast crosses the threshold (``observe``: nothing, only record)."""
Decision = Literal["pass", "abort", "reroute"]
ACTIONS: tuple[Action, ...] = ("abort", "reroute", "observe")
NOT_FOUND_REASON = "the sidecar had no forecast for this request before the deadline (NOT_FOUND)"
NO_CHUNK_REASON = "the stream ended before its first chunk, so the request id is unknown"
COMPLETE_NO_FORECAST = "the request's record is complete and carries no prefill forecast"
MAX_WAIT_MS = 60_000
"""The longest ``GetResidueRequest.wait_ms`` the sidecar accepts."""


class GatewayError(RuntimeError):
    """The upstream OpenAI server answered with an error."""


# ---------------------------------------------------------------------------------------------- policy
@dataclass(frozen=True, slots=True)
class Forecast:
    """What the sidecar said about one request before the deadline: a probability, or why there is none."""

    request_id: str
    probability: float | None = None
    """Calibrated failure probability; None when there is no forecast (then ``reason`` says why)."""
    threshold: float | None = None
    """The artifact's own flag threshold (as the sidecar reported it)."""
    flagged: bool = False
    """The sidecar's decision at the artifact's threshold."""
    forecast_id: str = ""
    reason: str = ""
    prefill_time: float | None = None
    """Unix seconds the plugin captured the last prompt row (end of prefill); None if not reported."""
    scored_time: float | None = None
    """Unix seconds the sidecar computed it (its clock)."""
    readable_time: float | None = None
    """Unix seconds (this host's clock) the gateway received the answer holding the score."""

    @property
    def available(self) -> bool:
        return self.probability is not None

    @property
    def latency_s(self) -> float | None:
        """End of prefill → forecast in the gateway's hands (same-host clocks)."""
        if self.prefill_time is None or self.readable_time is None:
            return None
        return self.readable_time - self.prefill_time


def _seconds(ts: Any) -> float:
    return ts.seconds + ts.nanos / 1e9


def forecast_from_record(rec: pb.ResidueRecord, readable_time: float) -> Forecast | None:
    """The forecast a ``GetResidue`` answer carries; None while the record is still in flight without one
    (ask again). A complete record without a forecast is "no forecast", never a score."""
    which = rec.prefill_forecast.WhichOneof("result")
    if which == "score":
        s = rec.prefill_forecast.score
        return Forecast(
            request_id=rec.request_id,
            probability=s.probability,
            threshold=s.threshold,
            flagged=s.flagged,
            forecast_id=s.forecast_id,
            prefill_time=_seconds(s.prefill_time) if s.HasField("prefill_time") else None,
            scored_time=_seconds(s.scored_time) if s.HasField("scored_time") else None,
            readable_time=readable_time,
        )
    if which == "unavailable_reason":
        return Forecast(request_id=rec.request_id, reason=rec.prefill_forecast.unavailable_reason)
    if rec.complete:
        return Forecast(request_id=rec.request_id, reason=COMPLETE_NO_FORECAST)
    return None


@dataclass(frozen=True, slots=True)
class Policy:
    """When and how the gateway acts on a forecast."""

    threshold: float | None = None
    """Act when probability ≥ threshold; None: act when the sidecar flagged it (the artifact's threshold)."""
    action: Action = "abort"
    deadline_s: float = 0.2
    """How long after the first chunk to wait for the forecast before passing the stream through."""
    poll_s: float = 0.002
    """Pause before asking again when an answer carried no forecast yet (``GetResidue`` waits for the
    record itself: ``wait_ms``)."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Policy.action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"Policy.threshold must be a probability in [0, 1] or None, got {self.threshold}"
            )
        if self.deadline_s < 0 or self.poll_s <= 0:
            raise ValueError("Policy.deadline_s must be ≥ 0 and Policy.poll_s > 0")


def crosses(fc: Forecast, threshold: float | None) -> bool:
    """Whether ``fc`` is at or above ``threshold`` (None: the sidecar's own flag). No forecast never
    crosses anything."""
    if fc.probability is None:
        return False
    return fc.flagged if threshold is None else fc.probability >= threshold


def decide(fc: Forecast, policy: Policy) -> Decision:
    """pass, or the policy's action when the forecast crosses its threshold."""
    if policy.action == "observe" or not crosses(fc, policy.threshold):
        return "pass"
    return policy.action


# ---------------------------------------------------------------------------------------------- sidecar
class SidecarForecasts:
    """Reads prefill forecasts from the sidecar's ``GetResidue`` (one channel, shared by all requests)."""

    def __init__(
        self, target: str, token: str = "", root_certificates: bytes | None = None, tenant: str = ""
    ) -> None:
        if root_certificates is None:
            self.channel = grpc.insecure_channel(target)
        else:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
        self.stub = pb_grpc.ResidueServiceStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.tenant = tenant

    def wait(self, request_id: str, deadline_s: float, poll_s: float = 0.002) -> Forecast:
        """The request's forecast, or a ``Forecast`` without probability saying why there is none: still
        NOT_FOUND at the deadline, the sidecar's ``unavailable_reason``, or a sidecar error.

        One ``GetResidue`` with ``wait_ms``: the sidecar holds the call until the record is stored (no
        polling load on the sidecar, no polling delay)."""
        end = time.monotonic() + deadline_s
        req = pb.GetResidueRequest(request_id=request_id, tenant=self.tenant)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return Forecast(request_id=request_id, reason=NOT_FOUND_REASON)
            req.wait_ms = max(1, min(MAX_WAIT_MS, int(left * 1e3)))
            try:
                # The sidecar answers NOT_FOUND just before this deadline (it waits min(wait_ms, deadline)).
                rec = self.stub.GetResidue(req, timeout=left, metadata=self.metadata)
            except grpc.RpcError as e:
                code = e.code()
                if code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED):
                    why = f"sidecar error {code.name}: {e.details() or ''}"
                    return Forecast(request_id=request_id, reason=why)
            else:
                fc = forecast_from_record(rec, time.time())
                if fc is not None:
                    return fc
            time.sleep(min(poll_s, max(0.0, end - time.monotonic())))

    def close(self) -> None:
        self.channel.close()


# ---------------------------------------------------------------------------------------------- HTTP
@dataclass(frozen=True, slots=True)
class Chunk:
    """One server-sent event of an OpenAI stream and when this host received it."""

    data: dict[str, Any]
    received: float
    """Unix seconds."""


def chunk_text(data: Mapping[str, Any]) -> str:
    """The text a completion or chat chunk adds."""
    out = []
    for c in data.get("choices") or ():
        out.append((c.get("text") or "") if "text" in c else ((c.get("delta") or {}).get("content") or ""))
    return "".join(out)


def chunk_tokens_so_far(data: Mapping[str, Any]) -> int | None:
    """Generated tokens so far, from the chunk's usage (``stream_options.continuous_usage_stats``)."""
    usage = data.get("usage")
    return int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else None


def _connection(base_url: str, timeout_s: float) -> http.client.HTTPConnection:
    u = urlsplit(base_url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return conn_cls(u.hostname or "127.0.0.1", u.port, timeout=timeout_s)


class OpenAIStream:
    """One streamed POST to an OpenAI-compatible server. A background thread reads the server-sent events
    into a queue as they arrive (stamped with their arrival time) while the caller asks the sidecar."""

    def __init__(
        self, base_url: str, path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
    ) -> None:  # fmt: skip
        u = urlsplit(base_url)
        self._conn = _connection(base_url, timeout_s)
        hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream", **(headers or {})}
        self._conn.request(
            "POST", u.path.rstrip("/") + path, json.dumps({**body, "stream": True}).encode(), hdrs
        )
        self._sock: socket.socket | None = self._conn.sock  # kept: abort() shuts it down under the reader
        resp = self._conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            self._conn.close()
            raise GatewayError(f"POST {path}: HTTP {resp.status}: {text[:500]}")
        self._resp = resp
        self._queue: queue.Queue[Chunk | BaseException | None] = queue.Queue()
        self._aborted = threading.Event()
        self._thread = threading.Thread(target=self._read, name="openai-stream", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in self._resp:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                self._queue.put(Chunk(json.loads(payload), time.time()))
        except Exception as e:  # a broken stream, or (after abort) the socket shut down under us
            if not self._aborted.is_set():
                self._queue.put(e)
        finally:
            self._queue.put(None)

    def next(self, timeout_s: float | None = None) -> Chunk | None:
        """The next chunk (None at the end of the stream); raises what broke the stream."""
        item = self._queue.get(timeout=timeout_s)
        if isinstance(item, BaseException):
            raise GatewayError(f"the stream broke: {item}") from item
        if item is not None and "error" in item.data:
            raise GatewayError(f"the server reported an error mid-stream: {item.data['error']}")
        if item is None:
            self._queue.put(None)  # later calls see the end too
        return item

    def __iter__(self) -> Iterator[Chunk]:
        while (c := self.next()) is not None:
            yield c

    def abort(self) -> None:
        """Close the connection: vLLM's server sees the client leave and aborts the request."""
        self._aborted.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader: its read returns at once
        self._thread.join(5)  # closing the response under a running reader would race with it
        self._conn.close()
        with contextlib.suppress(Exception):
            self._resp.close()

    def close(self) -> None:
        """Release the connection (at the end of the stream; ``abort`` before it)."""
        if self._thread.is_alive():
            self.abort()
        else:
            self._conn.close()


Fallback = Callable[[str, Mapping[str, Any], Forecast], Iterator[dict[str, Any]]]
"""``fallback(path, body, forecast)`` → chunks to serve instead (the reroute hook)."""


def openai_fallback(base_url: str, model: str | None = None) -> Fallback:
    """A reroute hook that streams the same request from another OpenAI server (e.g. a larger model)."""

    def reroute(path: str, body: Mapping[str, Any], forecast: Forecast) -> Iterator[dict[str, Any]]:
        s = OpenAIStream(base_url, path, {**body, **({"model": model} if model else {})})
        try:
            for c in s:
                yield c.data
        finally:
            s.close()

    return reroute


# ---------------------------------------------------------------------------------------------- gateway
class GatedStream:
    """One request through the gateway. After construction ``request_id``, ``forecast`` and ``decision``
    are known; iterating yields the chunks to forward: the upstream stream when passed, nothing when
    aborted (answer the client with an error of your choice), the fallback's chunks when rerouted.
    ``received`` keeps every upstream chunk with its arrival time (what ``--items`` measures with)."""

    def __init__(
        self, upstream: OpenAIStream, sidecar: SidecarForecasts, policy: Policy, path: str,
        body: Mapping[str, Any], fallback: Fallback | None,
    ) -> None:  # fmt: skip
        self.upstream, self.path, self.body, self.fallback = upstream, path, body, fallback
        self.received: list[Chunk] = []
        first = upstream.next()
        if first is None:
            self.request_id = ""
            self.forecast = Forecast(request_id="", reason=NO_CHUNK_REASON)
        else:
            self.received.append(first)
            self.request_id = str(first.data.get("id", ""))
            self.forecast = sidecar.wait(self.request_id, policy.deadline_s, policy.poll_s)
        self.decision: Decision = decide(self.forecast, policy)
        if self.decision != "pass":
            upstream.abort()  # reroute also stops the doomed generation here

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.decision == "abort":
            return
        if self.decision == "reroute":
            assert self.fallback is not None, "ForecastGateway refuses action='reroute' without a fallback"
            yield from self.fallback(self.path, self.body, self.forecast)
            return
        try:
            yield from (c.data for c in self.received)
            for c in self.upstream:
                self.received.append(c)
                yield c.data
        finally:
            self.upstream.close()


class ForecastGateway:
    """Streams requests from vLLM's OpenAI API and applies ``policy`` to each one's prefill forecast."""

    def __init__(
        self, base_url: str, sidecar: SidecarForecasts, policy: Policy, fallback: Fallback | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        if policy.action == "reroute" and fallback is None:
            raise ValueError("Policy.action='reroute' needs a fallback (e.g. openai_fallback(url))")
        self.base_url, self.sidecar, self.policy = base_url, sidecar, policy
        self.fallback, self.headers = fallback, dict(headers or {})

    def open(self, path: str, body: Mapping[str, Any]) -> GatedStream:
        """Start ``POST path`` (``/v1/completions`` or ``/v1/chat/completions``) with ``stream`` on and
        decide on it (waits for the first chunk and at most ``policy.deadline_s`` more)."""
        upstream = OpenAIStream(self.base_url, path, body, self.headers)
        try:
            return GatedStream(upstream, self.sidecar, self.policy, path, body, self.fallback)
        except BaseException:
            upstream.close()
            raise


# ---------------------------------------------------------------------------------------------- report
@dataclass(frozen=True, slots=True)
class ItemRun:
    """One labelled item run through the live stack to the end."""

    id: str
    task: str
    outcome: str
    """right / wrong / null (``shells.match.outcome``)."""
    request_id: str
    probability: float | None
    """None: no forecast before the deadline (``reason`` says why): such a request always passes."""
    flagged: bool
    """The sidecar's flag at the artifact's threshold."""
    threshold: float | None
    reason: str
    output_tokens: int
    tokens_after_forecast: int | None
    """Tokens generated after the forecast was in the gateway's hands: what an abort then would save."""
    latency_ms: float | None
    """End of prefill → forecast readable."""

    @property
    def failed(self) -> bool:
        return self.outcome != "right"


def threshold_at_fpr(success_probabilities: Sequence[float], fpr: float) -> float:
    """The lowest threshold at which at most ``fpr`` of these successes reach it: just above the
    (⌊fpr·n⌋+1)-th highest success probability (the empirical ROC read at ``fpr``, as
    ``detectors.evaluation.tpr_at_fpr`` does); +inf (flag nothing) without successes."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    neg = sorted(success_probabilities, reverse=True)
    allowed = math.floor(fpr * len(neg))
    return math.nextafter(neg[allowed], math.inf) if allowed < len(neg) else math.inf


@dataclass(frozen=True, slots=True)
class PolicyReport:
    """What aborting every request a threshold flags would have done on a labelled set."""

    name: str
    threshold: float | None
    """None for the artifact's own flags (its threshold is reported by the sidecar per request)."""
    n_items: int
    n_failures: int
    n_successes: int
    n_no_forecast: int
    failures_caught: int
    failures_caught_share: float
    answers_lost: int
    """Correct answers flagged: lost had they been aborted."""
    answers_lost_share: float
    """Of the successes (the realised false-positive rate)."""
    output_tokens: int
    tokens_saved: int
    """Tokens generated after the forecast was readable, summed over the flagged requests."""
    tokens_saved_share: float
    tokens_saved_on_failures: int


def _share(a: int, b: int) -> float:
    return a / b if b else math.nan


def evaluate_policy(runs: Sequence[ItemRun], name: str, threshold: float | None) -> PolicyReport:
    """Score a threshold (None: the artifact's own flags) on runs; runs without a forecast pass."""
    flagged = [crosses(_forecast_of(r), threshold) for r in runs]
    fails = [r.failed for r in runs]
    saved = [(r.tokens_after_forecast or 0) if f else 0 for r, f in zip(runs, flagged, strict=True)]
    n_fail = sum(fails)
    caught = sum(f and x for f, x in zip(flagged, fails, strict=True))
    lost = sum(f and not x for f, x in zip(flagged, fails, strict=True))
    out = sum(r.output_tokens for r in runs)
    return PolicyReport(
        name=name,
        threshold=threshold if threshold is None or math.isfinite(threshold) else None,
        n_items=len(runs),
        n_failures=n_fail,
        n_successes=len(runs) - n_fail,
        n_no_forecast=sum(r.probability is None for r in runs),
        failures_caught=caught,
        failures_caught_share=_share(caught, n_fail),
        answers_lost=lost,
        answers_lost_share=_share(lost, len(runs) - n_fail),
        output_tokens=out,
        tokens_saved=sum(saved),
        tokens_saved_share=_share(sum(saved), out),
        tokens_saved_on_failures=sum(s for s, x in zip(saved, fails, strict=True) if x),
    )


def _forecast_of(r: ItemRun) -> Forecast:
    return Forecast(request_id=r.request_id, probability=r.probability, flagged=r.flagged, reason=r.reason)


def policy_report(runs: Sequence[ItemRun], fprs: Sequence[float] = (0.01, 0.05)) -> list[PolicyReport]:
    """One row per FPR (threshold calibrated in-sample on the successes that have a forecast: optimistic
    on small sets, it is a read-out of the ROC, not a held-out calibration) plus the artifact's flags."""
    ok = [r.probability for r in runs if r.probability is not None and not r.failed]
    rows = [evaluate_policy(runs, f"fpr_{f:.0%}", threshold_at_fpr(ok, f)) for f in fprs]
    return [*rows, evaluate_policy(runs, "artifact", None)]


def _pct(x: float, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}s}" if math.isnan(x) else f"{x:{width}.{digits}%}"


def format_table(rows: Sequence[PolicyReport]) -> str:
    """The report as a text table: failures caught, correct answers lost, output tokens saved."""
    head = f"{'policy':9s} {'threshold':>9s} {'caught':>14s} {'lost':>14s} {'tokens saved':>21s}"
    lines = [head]
    for r in rows:
        thr = "artifact" if r.name == "artifact" else ("inf" if r.threshold is None else f"{r.threshold:.4f}")
        caught = f"{r.failures_caught:4d}/{r.n_failures:<4d}{_pct(r.failures_caught_share, 5)}"
        lost = f"{r.answers_lost:4d}/{r.n_successes:<4d}{_pct(r.answers_lost_share, 5)}"
        saved = f"{r.tokens_saved:7d}/{r.output_tokens:<7d}{_pct(r.tokens_saved_share, 6, 1)}"
        lines.append(f"{r.name:9s} {thr:>9s} {caught} {lost} {saved}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- items
def openai_request(
    prompt: str, chat: bool, model: str, max_tokens: int, **extra: Any
) -> tuple[str, dict[str, Any]]:
    """(path, body) of a greedy completion, or a one-message chat when ``chat``."""
    base: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, **extra}
    if chat:
        return "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**base, "prompt": prompt}


def run_item(
    gateway: ForecastGateway, item: Mapping[str, Any], model: str, max_tokens: int
) -> tuple[ItemRun, str]:
    """Run one labelled item to the end (the gateway's policy should be ``observe``) → (run, output)."""
    from residue_monitor.shells.match import outcome  # the labelling rule of `residue eval`

    usage = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    path, body = openai_request(item["prompt"], bool(item.get("chat", True)), model, max_tokens, **usage)
    gs = gateway.open(path, body)
    text = "".join(chunk_text(d) for d in gs)
    fc = gs.forecast
    counts = [(c.received, chunk_tokens_so_far(c.data)) for c in gs.received]
    counted = [n for _, n in counts if n is not None]
    total = max(counted) if counted else sum(bool(chunk_text(c.data)) for c in gs.received)
    after: int | None = None
    if fc.readable_time is not None:
        before = max((n for t, n in counts if n is not None and t <= fc.readable_time), default=0)
        after = max(total - before, 0)
    latency = fc.latency_s
    run = ItemRun(
        id=str(item["id"]),
        task=str(item["task"]),
        outcome=outcome(text, item["answers"], item.get("match", "contains")),
        request_id=gs.request_id,
        probability=fc.probability,
        flagged=fc.flagged,
        threshold=fc.threshold,
        reason=fc.reason,
        output_tokens=total,
        tokens_after_forecast=after,
        latency_ms=None if latency is None else latency * 1e3,
    )
    return run, text


def _finite(x: Any) -> Any:
    """JSON has no NaN / inf: write null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def run_items(
    gateway: ForecastGateway, items: Sequence[Mapping[str, Any]], model: str, max_tokens: int,
    concurrency: int = 4,
) -> list[ItemRun]:  # fmt: skip
    with ThreadPoolExecutor(max(1, concurrency)) as ex:
        return [r for r, _ in ex.map(lambda it: run_item(gateway, it, model, max_tokens), items)]


def _served_model(base_url: str) -> str:
    conn = _connection(base_url, 30.0)
    try:
        conn.request("GET", urlsplit(base_url).path.rstrip("/") + "/v1/models")
        return json.loads(conn.getresponse().read())["data"][0]["id"]
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="vLLM's OpenAI server")
    ap.add_argument("--sidecar", default="127.0.0.1:50051", help="the sidecar's gRPC target")
    ap.add_argument("--token", default=os.environ.get("RESIDUE_TOKEN", ""), help="sidecar bearer token")
    ap.add_argument("--ca", type=Path, default=None, help="PEM root certificates of a TLS sidecar")
    ap.add_argument("--tenant", default="")
    ap.add_argument("--model", default="", help="served model name (default: the server's first)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="act at probability ≥ this (default: when the sidecar flags it)")  # fmt: skip
    ap.add_argument("--action", choices=ACTIONS, default="abort")
    ap.add_argument("--fallback-url", default="", help="reroute target (an OpenAI server)")
    ap.add_argument("--fallback-model", default="")
    ap.add_argument("--deadline-ms", type=float, default=200.0, help="wait this long for a forecast")
    ap.add_argument("--poll-ms", type=float, default=2.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one request through the gateway")
    what.add_argument("--items", type=Path, help="a labelled JSONL set (residue eval-data format)")
    ap.add_argument("--chat", action="store_true", help="--prompt as a chat message")
    ap.add_argument("--out", type=Path, default=None, help="--items: write the runs and report as JSON")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="--items: only the first N")
    args = ap.parse_args(argv)

    ca = args.ca.read_bytes() if args.ca else None
    sidecar = SidecarForecasts(args.sidecar, args.token, ca, args.tenant)
    fallback = openai_fallback(args.fallback_url, args.fallback_model or None) if args.fallback_url else None
    model = args.model or _served_model(args.base_url)
    try:
        if args.prompt is not None:
            policy = Policy(args.threshold, args.action, args.deadline_ms / 1e3, args.poll_ms / 1e3)
            gateway = ForecastGateway(args.base_url, sidecar, policy, fallback)
            gs = gateway.open(*openai_request(args.prompt, args.chat, model, args.max_tokens))
            fc = gs.forecast
            p = "none" if fc.probability is None else f"{fc.probability:.4f}"
            print(f"{gs.request_id}: forecast {p} {fc.reason} → {gs.decision}", file=sys.stderr)
            if gs.decision == "abort":
                return 3
            for d in gs:
                print(chunk_text(d), end="", flush=True)
            print()
            return 0
        from residue_monitor.detectors.exceptions import InvalidInput
        from residue_monitor.service.evaldata import read_items

        try:
            items = read_items(args.items)
        except InvalidInput as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        items = items[: args.limit] if args.limit else items
        # observe: every generation runs to the end, so its right/wrong label is known
        policy = Policy(args.threshold, "observe", args.deadline_ms / 1e3, args.poll_ms / 1e3)
        runs = run_items(ForecastGateway(args.base_url, sidecar, policy), items, model, args.max_tokens,
                         args.concurrency)  # fmt: skip
        rows = policy_report(runs)
        print(format_table(rows))
        n_fc = sum(r.probability is not None for r in runs)
        print(f"{len(runs)} items, {n_fc} with a forecast; thresholds at 1 %/5 % FPR are read in-sample")
        if args.out:
            doc = {
                "model": model,
                "policy": asdict(policy),
                "max_tokens": args.max_tokens,
                "report": [{k: _finite(v) for k, v in asdict(r).items()} for r in rows],
                "runs": [asdict(r) for r in runs],
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
        return 0
    finally:
        sidecar.close()


if __name__ == "__main__":
    sys.exit(main())

"""The Prometheus exporter: accumulator → frozen snapshot → collector → exposition (DESIGN.md §7).

Every test uses a fresh ``CollectorRegistry`` (STYLE.md rule 8); the HTTP test binds port 0.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service.exporter import (
    DROP_REASONS,
    ERROR_RATIO_BUCKETS,
    HELP,
    LAYER_BANDS,
    PHASES,
    TRACE_CODES,
    StatsAccumulator,
    layer_band,
    register_collectors,
    start_metrics_server,
)

NOW = 1_700_000_000.0
FINGERPRINTS = ("v1", "meta")

# family name → (type, label names other than `le`)
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "residue_requests": ("counter", set()),
    "residue_frames": ("counter", {"phase"}),
    "residue_frames_dropped": ("counter", {"reason"}),
    "residue_flags": ("counter", {"fingerprint"}),
    "residue_store_errors": ("counter", set()),
    "residue_prefill_flags": ("counter", set()),
    "residue_store_backlog": ("gauge", set()),
    "residue_fingerprint_score": ("histogram", {"fingerprint"}),
    "residue_error_ratio": ("histogram", {"layer_band"}),
    "residue_attention_entropy": ("histogram", set()),
    "residue_ingest_latency_seconds": ("histogram", set()),
    "residue_capture_overhead_seconds": ("histogram", set()),
    "residue_prefill_risk": ("histogram", set()),
    "residue_trace_calls": ("counter", {"code"}),
}


def feed(acc: StatsAccumulator) -> None:
    """Touch every metric the accumulator has, with hand-checkable values."""
    acc.inc_requests(3)
    acc.inc_frames("prompt_last", 3)
    acc.inc_frames("decode", 10)
    acc.inc_frames_dropped("queue_full", 2)
    acc.observe_fingerprint_score("v1", 0.93, "req-1", flagged=True)
    acc.observe_fingerprint_score("v1", 0.2, "req-2")
    acc.observe_fingerprint_score("meta", 0.4, "req-1")
    acc.observe_error_ratio("early", 0.1)
    acc.observe_error_ratio("late", 0.6)
    acc.observe_attention_entropy(2.5)
    acc.observe_ingest_latency(0.002)
    acc.inc_store_errors()
    acc.set_store_backlog(7)
    acc.observe_capture_overhead(0.0004)
    acc.observe_prefill_risk(0.8, "req-3", flagged=True)
    acc.observe_prefill_risk(0.1, "req-1")
    acc.inc_trace_calls("ok")
    acc.inc_trace_calls("resource_exhausted")
    acc.inc_trace_calls("unauthenticated")  # not a Trace outcome: folds into "other"


@pytest.fixture()
def acc() -> StatsAccumulator:
    return StatsAccumulator(FINGERPRINTS, clock=lambda: NOW)


@pytest.fixture()
def registry(acc: StatsAccumulator) -> CollectorRegistry:
    reg = CollectorRegistry()
    register_collectors(reg, acc.snapshot)
    return reg


def residue_families(registry: CollectorRegistry) -> dict[str, tuple[str, set[str], set[tuple[str, str]]]]:
    """family → (type, label names without `le`, every (label, value) pair) for residue_* families."""
    out: dict[str, tuple[str, set[str], set[tuple[str, str]]]] = {}
    for fam in registry.collect():
        if fam.name.startswith("residue_"):
            pairs = {(k, v) for s in fam.samples for k, v in s.labels.items() if k != "le"}
            out[fam.name] = (fam.type, {k for k, _ in pairs}, pairs)
    return out


def test_every_family_present_with_type_and_labels(
    acc: StatsAccumulator, registry: CollectorRegistry
) -> None:
    """All DESIGN §7 families are emitted with their type and closed label names, and values land."""
    feed(acc)
    fams = residue_families(registry)
    assert set(fams) == set(EXPECTED) == set(HELP)
    for name, (typ, labels) in EXPECTED.items():
        assert fams[name][:2] == (typ, labels), name
    get = registry.get_sample_value
    assert get("residue_requests_total") == 3
    assert get("residue_frames_total", {"phase": "decode"}) == 10
    assert get("residue_frames_total", {"phase": "final"}) == 0
    assert get("residue_frames_dropped_total", {"reason": "queue_full"}) == 2
    assert get("residue_flags_total", {"fingerprint": "v1"}) == 1
    assert get("residue_flags_total", {"fingerprint": "meta"}) == 0
    assert get("residue_store_errors_total") == 1
    assert get("residue_store_backlog") == 7
    assert get("residue_prefill_flags_total") == 1
    assert get("residue_fingerprint_score_count", {"fingerprint": "v1"}) == 2
    assert get("residue_fingerprint_score_sum", {"fingerprint": "v1"}) == pytest.approx(1.13)
    assert get("residue_prefill_risk_count") == 2
    assert get("residue_capture_overhead_seconds_bucket", {"le": "0.0005"}) == 1
    assert get("residue_trace_calls_total", {"code": "ok"}) == 1
    assert get("residue_trace_calls_total", {"code": "other"}) == 1
    assert get("residue_trace_calls_total", {"code": "internal"}) == 0


def test_histogram_buckets_cumulative_le_inclusive_and_sum(
    acc: StatsAccumulator, registry: CollectorRegistry
) -> None:
    """Bucket counts are cumulative, a value equal to a bound counts in that bucket, big ones hit +Inf."""
    values = [0.05, 0.07, 0.5, 0.55, 3.0]  # 0.05 and 0.5 are exact bounds; 3.0 is past the last (2.0)
    for v in values:
        acc.observe_error_ratio("middle", v)
    get = registry.get_sample_value

    def bucket(le: str) -> float | None:
        return get("residue_error_ratio_bucket", {"layer_band": "middle", "le": le})

    assert bucket("0.05") == 1
    assert bucket("0.1") == 2
    assert bucket("0.4") == 2
    assert bucket("0.5") == 3
    assert bucket("0.6") == 4
    assert bucket("2.0") == 4
    assert bucket("+Inf") == 5
    assert get("residue_error_ratio_count", {"layer_band": "middle"}) == 5
    assert get("residue_error_ratio_sum", {"layer_band": "middle"}) == pytest.approx(sum(values))
    # Untouched bands still export all-zero series, so rate() has a series from the first scrape.
    assert get("residue_error_ratio_bucket", {"layer_band": "early", "le": "+Inf"}) == 0
    snap = acc.snapshot().error_ratio["middle"]
    assert snap.bounds == ERROR_RATIO_BUCKETS
    assert len(snap.counts) == len(ERROR_RATIO_BUCKETS) + 1 and snap.count == 5


def test_label_cardinality_bounded(acc: StatsAccumulator, registry: CollectorRegistry) -> None:
    """Unknown fingerprints, reasons and trace codes fold into "other"; request ids never appear as label
    values."""
    for i in range(300):
        acc.observe_fingerprint_score(f"fp-{i}", 0.5, f"req-{i}", flagged=True)
        acc.inc_frames_dropped(f"reason-{i}")
        acc.inc_trace_calls(f"code-{i}")
    fams = residue_families(registry)
    allowed = {
        "fingerprint": {*FINGERPRINTS, "other"},
        "reason": set(DROP_REASONS),
        "phase": set(PHASES),
        "layer_band": set(LAYER_BANDS),
        "code": set(TRACE_CODES),
    }
    for name, (_, _, pairs) in fams.items():
        for label, value in pairs:
            assert value in allowed[label], (name, label, value)
    assert registry.get_sample_value("residue_flags_total", {"fingerprint": "other"}) == 300
    assert registry.get_sample_value("residue_frames_dropped_total", {"reason": "other"}) == 300
    assert registry.get_sample_value("residue_trace_calls_total", {"code": "other"}) == 300
    assert "req-" not in generate_latest(registry).decode()


def test_bad_inputs_raise_named_errors(acc: StatsAccumulator) -> None:
    """Our own closed sets (phase, band) reject unknowns; NaN and negative counts are refused."""
    with pytest.raises(InvalidInput, match="phase must be one of prompt_last, decode, final"):
        acc.inc_frames("prefill")
    with pytest.raises(InvalidInput, match="layer_band"):
        acc.observe_error_ratio("top", 0.5)
    with pytest.raises(InvalidInput, match="finite"):
        acc.observe_attention_entropy(float("nan"))
    with pytest.raises(InvalidInput, match="finite"):
        acc.observe_fingerprint_score("v1", float("inf"))
    with pytest.raises(InvalidInput, match=">= 0"):
        acc.inc_requests(-1)
    with pytest.raises(InvalidInput, match="other"):
        StatsAccumulator(["v1", "other"])
    assert acc.snapshot().attention_entropy.count == 0


@pytest.mark.parametrize(
    ("layer", "n_layers", "band"),
    [(0, 30, "early"), (9, 30, "early"), (10, 30, "middle"), (19, 30, "middle"), (20, 30, "late"),
     (29, 30, "late"), (0, 1, "early"), (1, 2, "middle"), (3, 4, "late")],
)  # fmt: skip
def test_layer_band_thirds(layer: int, n_layers: int, band: str) -> None:
    """Layers split into early/middle/late thirds, for any depth including tiny test models."""
    assert layer_band(layer, n_layers) == band


def test_layer_band_out_of_range() -> None:
    """A layer index outside the model is a caller bug, reported with the valid range."""
    with pytest.raises(InvalidInput, match=r"\[0, 4\)"):
        layer_band(4, 4)


def test_exemplars_in_openmetrics_only(acc: StatsAccumulator, registry: CollectorRegistry) -> None:
    """The flag counter and score buckets carry the latest request id as an OpenMetrics exemplar."""
    feed(acc)
    long_id = "chatcmpl-" + "x" * 300
    acc.observe_fingerprint_score("meta", 0.97, long_id, flagged=True)
    text = generate_openmetrics(registry).decode()

    def exemplar_of(series: str) -> str:
        line = next(ln for ln in text.splitlines() if ln.startswith(series + " "))
        return line.partition(" # ")[2]

    assert exemplar_of('residue_flags_total{fingerprint="v1"}') == f'{{request_id="req-1"}} 0.93 {NOW}'
    v1_bucket = 'residue_fingerprint_score_bucket{fingerprint="v1",le="0.95"}'
    assert exemplar_of(v1_bucket) == f'{{request_id="req-1"}} 0.93 {NOW}'
    assert exemplar_of('residue_fingerprint_score_bucket{fingerprint="v1",le="0.2"}') == (
        f'{{request_id="req-2"}} 0.2 {NOW}'
    )
    assert exemplar_of('residue_fingerprint_score_bucket{fingerprint="v1",le="0.1"}') == ""
    assert exemplar_of("residue_prefill_flags_total") == f'{{request_id="req-3"}} 0.8 {NOW}'
    # OpenMetrics limits an exemplar's labels to 128 characters; Prometheus rejects the scrape otherwise.
    ids = re.findall(r'request_id="([^"]*)"', text)
    assert ids and all(len("request_id") + len(i) <= 128 for i in ids)
    assert any(i.startswith("chatcmpl-xxx") for i in ids)
    # The whole exposition parses as OpenMetrics, exemplars included.
    flags = next(f for f in parse_openmetrics(text) if f.name == "residue_flags")
    exemplars = [s.exemplar for s in flags.samples if s.exemplar is not None]
    assert {e.labels["request_id"] for e in exemplars} >= {"req-1"}
    # The classic text format has no exemplars.
    assert " # {" not in generate_latest(registry).decode()


def test_snapshot_is_frozen_and_detached(acc: StatsAccumulator) -> None:
    """A snapshot neither changes after later updates nor can be mutated by its reader."""
    feed(acc)
    snap = acc.snapshot()
    acc.inc_requests(100)
    acc.observe_error_ratio("late", 0.6)
    assert snap.requests == 3
    assert snap.error_ratio["late"].count == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.requests = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.flags["v1"] = 9  # type: ignore[index]


def test_concurrent_updates_are_not_lost(acc: StatsAccumulator) -> None:
    """Many server threads updating at once lose no increments or observations."""

    def work() -> None:
        for _ in range(2000):
            acc.inc_frames("decode")
            acc.observe_ingest_latency(0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = acc.snapshot()
    assert snap.frames["decode"] == 8000
    assert snap.ingest_latency_seconds.count == 8000


def test_registry_is_injected_with_process_metrics(
    registry: CollectorRegistry, acc: StatsAccumulator
) -> None:
    """Metrics land on the given registry only (never the global one), process metrics included,
    and a second collector with the same names is refused."""
    assert not any(f.name.startswith("residue_") for f in REGISTRY.collect())
    assert registry.get_sample_value("residue_requests_total") == 0
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register_collectors(registry, acc.snapshot)


def test_http_server_on_port_zero_serves_parsable_metrics(
    acc: StatsAccumulator, registry: CollectorRegistry
) -> None:
    """start_metrics_server binds port 0, serves /metrics over real HTTP in both formats, and stops."""
    feed(acc)
    server = start_metrics_server(registry, "127.0.0.1", 0)
    try:
        assert server.port > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        for name, (typ, _) in EXPECTED.items():
            assert fams[name].type == typ, name
        requests = next(s for s in fams["residue_requests"].samples if s.name == "residue_requests_total")
        assert requests.value == 3
        assert "process_cpu_seconds" in fams
        om = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(om, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert '# {request_id="req-1"}' in resp.read().decode()
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)

"""The residue-monitor Grafana dashboard, generated in code (grafana-foundation-sdk builders).

``residue-dashboard.json`` beside this file is this module's output, committed so that operators can import
it without Python; a test fails when the two differ. Regenerate after any change here:

    python -m deploy.grafana.dashboard            # rewrite residue-dashboard.json
    python -m deploy.grafana.dashboard --check    # exit 1 if the committed file is stale

Every query reads raw ``residue_*`` series from ``service/exporter.py`` (tests/integration/test_deploy.py
runs each one against a real Prometheus): recorded series carry no exemplars, and the request id on the
flag counters and score buckets is what the score and flag panels link from.

Template variables: ``$datasource``; ``$job``, ``$instance`` and ``$fingerprint`` (multi-select, "All"
is the regex ``.+``); ``$record_url``, the prefix that a request id is appended to in the exemplar links
(set it to wherever your residue records are browsed, e.g. a grpc-gateway in front of GetResidue).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models import prometheus as prometheus_model

OUTPUT = Path(__file__).with_name("residue-dashboard.json")
UID = "residue-monitor"
# "All" in a multi-select variable becomes this regex (Grafana's default would list every value).
ALL = ".+"
SEL = 'job=~"$job", instance=~"$instance"'
FP_SEL = f'{SEL}, fingerprint=~"$fingerprint"'
RATE = "$__rate_interval"
# Data link on exemplars: the request id an exemplar carries (exporter.RequestExemplar, label request_id).
REQUEST_LINK_TITLE = "Residue record ${__data.fields.request_id}"
REQUEST_LINK_URL = "${record_url}${__data.fields.request_id}"
# A placeholder (the .invalid TLD never resolves): set it per Grafana instance.
RECORD_URL_DEFAULT = "https://residue.example.invalid/requests/"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

PanelKind = Literal["timeseries", "heatmap", "stat"]


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL target; ``exemplar`` asks Grafana to fetch the series' exemplars alongside."""

    expr: str
    legend: str = ""
    exemplar: bool = False
    heatmap: bool = False  # format=heatmap: buckets as rows of a heatmap, ``legend`` should be {{le}}


@dataclass(frozen=True, slots=True)
class Panel:
    """What a panel shows; layout (x, y) is left to the dashboard builder, size is set here."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: PanelKind = "timeseries"
    width: int = 12
    height: int = 8
    request_links: bool = False  # exemplar data links to $record_url<request_id>
    right_axis_refs: tuple[str, ...] = ()  # refIds drawn against a right-hand axis (another unit)
    right_unit: str = "short"
    min_value: float | None = None


@dataclass(frozen=True, slots=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _rate(metric: str, selector: str = SEL, by: str = "") -> str:
    inner = f"rate({metric}{{{selector}}}[{RATE}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def _quantile(q: float, histogram: str, selector: str = SEL, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket{{{selector}}}[{RATE}])))"


def _mean(histogram: str, selector: str = SEL, by: str = "") -> str:
    return f"{_rate(histogram + '_sum', selector, by)}\n  /\n{_rate(histogram + '_count', selector, by)}"


REQUESTS = _rate("residue_requests_total")

ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        (
            Panel(
                "Requests",
                "Requests the residue sidecars saw start, per second.",
                (Query(REQUESTS),),
                unit="reqps",
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Flags per request",
                "Fingerprint flags per request, all fingerprints together (a request two fingerprints flag "
                "counts twice).",
                (Query(f"{_rate('residue_flags_total', FP_SEL)}\n  /\n{REQUESTS}"),),
                unit="percentunit",
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Frames dropped",
                "Share of residue frames lost before ingest (dropped / (ingested + dropped)). Above 1 % "
                "the ResidueFramesDropped alert fires: signatures become incomplete.",
                (
                    Query(
                        f"{_rate('residue_frames_dropped_total')}\n  /\n"
                        f"({_rate('residue_frames_total')} + {_rate('residue_frames_dropped_total')})"
                    ),
                ),
                unit="percentunit",
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Sidecars up",
                "Residue sidecar targets Prometheus scraped successfully.",
                (Query(f"sum(up{{{SEL}}})"),),
                kind="stat",
                width=6,
                height=4,
            ),
        ),
    ),
    Row(
        "Flags",
        (
            Panel(
                "Flag rate per fingerprint",
                "Requests each fingerprint flagged, per second. The dots are exemplars: the latest flagged "
                "request, linked to its residue record.",
                (
                    Query(
                        _rate("residue_flags_total", FP_SEL, by="fingerprint"),
                        "{{fingerprint}}",
                        exemplar=True,
                    ),
                ),
                unit="ops",
                request_links=True,
            ),
            Panel(
                "Flagged share per fingerprint",
                "Share of requests each fingerprint flagged (what the ResidueFingerprintFlagRateHigh alert "
                "compares with its 1-day baseline).",
                (
                    Query(
                        f"{_rate('residue_flags_total', FP_SEL, by='fingerprint')}\n"
                        f"  / on () group_left ()\n{REQUESTS}",
                        "{{fingerprint}}",
                    ),
                ),
                unit="percentunit",
                min_value=0,
            ),
            Panel(
                "Requests rate",
                "Requests started per second, per sidecar.",
                (Query(_rate("residue_requests_total", by="instance"), "{{instance}}"),),
                unit="reqps",
                min_value=0,
            ),
            Panel(
                "Prefill risk",
                "Failure forecast at the last prompt token, before any output (quantiles of "
                "residue_prefill_risk), and the share of requests it flagged. Exemplars link to requests.",
                (
                    Query(_quantile(0.5, "residue_prefill_risk"), "p50 risk", exemplar=True),
                    Query(_quantile(0.9, "residue_prefill_risk"), "p90 risk", exemplar=True),
                    Query(f"{_rate('residue_prefill_flags_total')}\n  /\n{REQUESTS}", "flagged share"),
                ),
                unit="percentunit",
                request_links=True,
                min_value=0,
            ),
        ),
    ),
    Row(
        "Fingerprint scores",
        (
            Panel(
                "Fingerprint score quantiles",
                "Median and p90 match score per fingerprint. Exemplars are the latest request in each "
                "score bucket, linked to its residue record.",
                (
                    Query(
                        _quantile(0.5, "residue_fingerprint_score", FP_SEL, by="fingerprint"),
                        "{{fingerprint}} p50",
                        exemplar=True,
                    ),
                    Query(
                        _quantile(0.9, "residue_fingerprint_score", FP_SEL, by="fingerprint"),
                        "{{fingerprint}} p90",
                        exemplar=True,
                    ),
                ),
                request_links=True,
                min_value=0,
            ),
            Panel(
                "Fingerprint score distribution",
                "Scores of the selected fingerprints per bucket over time (residue_fingerprint_score "
                "buckets). Exemplars link to requests.",
                (
                    Query(
                        _rate("residue_fingerprint_score_bucket", FP_SEL, by="le"),
                        "{{le}}",
                        exemplar=True,
                        heatmap=True,
                    ),
                ),
                kind="heatmap",
                request_links=True,
            ),
        ),
    ),
    Row(
        "Model internals",
        (
            Panel(
                "CLT error ratio by layer band",
                "||mlp_out - CLT reconstruction|| / ||mlp_out|| per layer band: mean and p90. A move either "
                "way (ResidueErrorRatioDrift) means the traffic or the model changed, or the CLT no longer "
                "fits.",
                (
                    Query(_mean("residue_error_ratio", by="layer_band"), "{{layer_band}} mean"),
                    Query(_quantile(0.9, "residue_error_ratio", by="layer_band"), "{{layer_band}} p90"),
                ),
                min_value=0,
            ),
            Panel(
                "Attention entropy",
                "Per-head attention entropy at sampled rows, in nats: p10, median, p90. Falling entropy is "
                "attention collapsing onto few positions (trapping, sinks).",
                (
                    Query(_quantile(0.1, "residue_attention_entropy"), "p10"),
                    Query(_quantile(0.5, "residue_attention_entropy"), "p50"),
                    Query(_quantile(0.9, "residue_attention_entropy"), "p90"),
                ),
                min_value=0,
            ),
        ),
    ),
    Row(
        "Pipeline health",
        (
            Panel(
                "Capture overhead",
                "Forward-pass time the plugin's capture added per step (p50, p99).",
                (
                    Query(_quantile(0.5, "residue_capture_overhead_seconds"), "p50"),
                    Query(_quantile(0.99, "residue_capture_overhead_seconds"), "p99"),
                ),
                unit="s",
                width=8,
                min_value=0,
            ),
            Panel(
                "Ingest latency",
                "Time the sidecar took to ingest one frame (p50, p99).",
                (
                    Query(_quantile(0.5, "residue_ingest_latency_seconds"), "p50"),
                    Query(_quantile(0.99, "residue_ingest_latency_seconds"), "p99"),
                ),
                unit="s",
                width=8,
                min_value=0,
            ),
            Panel(
                "Frames ingested by phase",
                "Residue frames ingested per second: the last prompt token, sampled decode steps, the final "
                "token.",
                (Query(_rate("residue_frames_total", by="phase"), "{{phase}}"),),
                unit="ops",
                width=8,
                min_value=0,
            ),
            Panel(
                "Frames dropped by reason",
                "Frames lost before ingest, per second, by reason (queue_full: the plugin's bounded queue; "
                "send_error: the stream to the sidecar; invalid_frame / unknown_request: rejected).",
                (Query(_rate("residue_frames_dropped_total", by="reason"), "{{reason}}"),),
                unit="ops",
                width=8,
                min_value=0,
            ),
            Panel(
                "Store errors and backlog",
                "Failed store operations per second (left) and records buffered in memory while the store "
                "is unavailable (right).",
                (
                    Query(_rate("residue_store_errors_total", by="instance"), "errors {{instance}}"),
                    Query(f"sum by (instance) (residue_store_backlog{{{SEL}}})", "backlog {{instance}}"),
                ),
                unit="ops",
                width=8,
                right_axis_refs=("B",),
                right_unit="short",
                min_value=0,
            ),
            Panel(
                "Sidecar process",
                "CPU (cores, left) and resident memory (right) of each sidecar process.",
                (
                    Query(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "cpu {{instance}}"),
                    Query(f"process_resident_memory_bytes{{{SEL}}}", "rss {{instance}}"),
                ),
                unit="short",
                width=8,
                right_axis_refs=("B",),
                right_unit="bytes",
                min_value=0,
            ),
        ),
    ),
)


def _ref_id(i: int) -> str:
    return chr(ord("A") + i)


def _target(q: Query, i: int) -> prometheus.Dataquery:
    t = prometheus.Dataquery().expr(q.expr).ref_id(_ref_id(i)).datasource(DATASOURCE).range()
    if q.legend:
        t = t.legend_format(q.legend)
    if q.exemplar:
        t = t.exemplar(True)
    if q.heatmap:
        t = t.format(prometheus_model.PromQueryFormat.HEATMAP)
    return t


def _request_link() -> gdash.DashboardLink:
    return gdash.DashboardLink(REQUEST_LINK_TITLE).url(REQUEST_LINK_URL).target_blank(True)


def _timeseries(p: Panel) -> timeseries.Panel:
    b = timeseries.Panel().unit(p.unit).fill_opacity(10).line_width(1)
    if p.min_value is not None:
        b = b.min(p.min_value)
    for ref in p.right_axis_refs:
        b = b.override_by_query(
            ref,
            [
                model.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                model.DynamicConfigValue(id_val="unit", value=p.right_unit),
            ],
        )
    return b


def _heatmap(p: Panel) -> heatmap.Panel:
    # Buckets come pre-computed from Prometheus (calculate off); le labels are the y axis.
    color = (
        heatmap.HeatmapColorOptions()
        .mode(heatmap_model.HeatmapColorMode.SCHEME)
        .scheme("Oranges")
        .scale(heatmap_model.HeatmapColorScale.EXPONENTIAL)
        .exponent(0.5)
        .steps(64)
        .fill("dark-orange")
    )
    return (
        heatmap.Panel()
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit(p.unit))
        .color(color)
        .cell_gap(1)
        .exemplars_color("rgba(255,0,255,0.7)")
    )


def _panel(p: Panel, panel_id: int) -> timeseries.Panel | heatmap.Panel | stat.Panel:
    b: timeseries.Panel | heatmap.Panel | stat.Panel
    if p.kind == "heatmap":
        b = _heatmap(p)
    elif p.kind == "stat":
        b = stat.Panel().unit(p.unit)
    else:
        b = _timeseries(p)
    b = b.id(panel_id).title(p.title).description(p.description).datasource(DATASOURCE)
    b = b.span(p.width).height(p.height)
    for i, q in enumerate(p.queries):
        b = b.with_target(_target(q, i))
    if p.request_links:
        b = b.data_links([_request_link()])
    return b


def _label_variable(name: str, label: str, query: str) -> gdash.QueryVariable:
    return (
        gdash.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(ALL)
        .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def build() -> gdash.Dashboard:
    """The dashboard: variables, then one row per :data:`ROWS` entry with its panels below it."""
    d = (
        gdash.Dashboard("Residue monitor")
        .uid(UID)
        .description(
            "Live residue of a vLLM server (residue-monitor): fingerprint flags and scores, model internals "
            "(CLT error ratio, attention entropy), capture and ingest health. Generated by "
            "deploy/grafana/dashboard.py; edit that, not this JSON."
        )
        .tags(["residue-monitor", "vllm", "llm"])
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(gdash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(_label_variable("job", "Job", "label_values(residue_requests_total, job)"))
        .with_variable(
            _label_variable(
                "instance", "Instance", 'label_values(residue_requests_total{job=~"$job"}, instance)'
            )
        )
        .with_variable(
            _label_variable(
                "fingerprint",
                "Fingerprint",
                'label_values(residue_fingerprint_score_bucket{job=~"$job"}, fingerprint)',
            )
        )
        .with_variable(
            gdash.TextBoxVariable("record_url")
            .label("Record URL prefix")
            .description("Exemplar links open this prefix followed by the request id.")
            .default_value(RECORD_URL_DEFAULT)
            .current(model.VariableOption(text=RECORD_URL_DEFAULT, value=RECORD_URL_DEFAULT))
        )
    )
    # Expanded rows: Grafana keeps an open row's panels after it in the top-level list (row.panels
    # holds them only while the row is collapsed).
    panel_id = 1
    for row in ROWS:
        d = d.with_row(gdash.Row(row.title).id(panel_id))
        panel_id += 1
        for p in row.panels:
            d = d.with_panel(_panel(p, panel_id))
            panel_id += 1
    return d


def render() -> str:
    """The dashboard as the JSON text that is committed: sorted keys, 2-space indent, final newline."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write (default: beside this file)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text(encoding="utf-8") != text:
            print(f"{args.out} is stale: run python -m deploy.grafana.dashboard", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

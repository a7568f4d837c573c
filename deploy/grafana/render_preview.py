"""Draw dashboard-preview.png: every panel of residue-dashboard.json, plotted from a real Prometheus.

    python -m deploy.grafana.render_preview [--seconds 120] [--out PATH]

Starts the synthetic residue sidecar and a private Prometheus (deploy/grafana/livecheck.py), lets traffic
flow for ``--seconds`` with an "incident" in the second half (three times the failing requests), then runs
each panel's queries through Prometheus' HTTP API (``query_range``, exemplars through ``query_exemplars``)
and lays the panels out on the dashboard's own 24-column grid. Not Grafana's rendering: a check that
every panel has data, and a picture of what each one shows.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import EngFormatter, Formatter, PercentFormatter

from deploy.grafana.dashboard import OUTPUT as DASHBOARD_JSON
from deploy.grafana.livecheck import (
    PanelTarget,
    PrometheusServer,
    SyntheticTraffic,
    panel_targets,
    prometheus_binary,
    query_variables,
    running_prometheus,
    substitute,
    synthetic_sidecar,
)

PREVIEW = Path(__file__).with_name("dashboard-preview.png")
STEP_S = 2.0
RATE_INTERVAL = "15s"
GRID_ROW_INCHES = 0.42  # one Grafana grid unit (30 px) of height
MAX_EXEMPLARS = 200  # per panel
WARMUP_S = 15.0  # one rate window, so that no rate starts from an empty window


def _legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for k, v in labels.items():
        text = text.replace("{{" + k + "}}", v)
    return text or ",".join(f"{k}={v}" for k, v in labels.items()) or "value"


def _series(prom: PrometheusServer, t: PanelTarget, start: float, end: float) -> list[tuple[str, Any, Any]]:
    expr = substitute(t.expr, query_variables(RATE_INTERVAL))
    out = []
    for s in prom.query_range(expr, start, end, STEP_S):
        ts = np.array([float(v[0]) for v in s["values"]]) - end
        ys = np.array([float(v[1]) for v in s["values"]])
        out.append((_legend(t.legend, s["metric"]), ts, ys))
    return out


def _exemplars(prom: PrometheusServer, t: PanelTarget, start: float, end: float) -> tuple[Any, Any]:
    expr = substitute(t.expr, query_variables(RATE_INTERVAL))
    points = [(float(e["timestamp"]), float(e["value"])) for s in prom.query_exemplars(expr, start, end)
              for e in s["exemplars"]]  # fmt: skip
    if not points:
        return np.array([]), np.array([])
    ts, ys = zip(*sorted(points), strict=True)
    return np.array(ts) - end, np.array(ys)


def _draw_heatmap(ax: Axes, series: list[tuple[str, Any, Any]]) -> None:
    """Per-bucket rates (cumulative in ``le``) turned into per-bucket counts, bucket index on the y axis."""
    rows = sorted(series, key=lambda s: math.inf if s[0] == "+Inf" else float(s[0]))
    if not rows:
        return
    times = np.unique(np.concatenate([r[1] for r in rows]))
    cumulative = np.zeros((len(rows), len(times)))
    for i, (_, ts, ys) in enumerate(rows):
        cumulative[i, np.searchsorted(times, ts)] = np.nan_to_num(ys)
    per_bucket = np.diff(cumulative, axis=0, prepend=0.0).clip(min=0)
    x_edges = np.append(times, times[-1] + STEP_S) - STEP_S / 2
    ax.pcolormesh(x_edges, np.arange(len(rows) + 1), per_bucket, cmap="Oranges", shading="flat")
    ticks = range(0, len(rows), max(1, len(rows) // 5))
    ax.set_yticks([i + 0.5 for i in ticks], [rows[i][0] for i in ticks])


def _formatter(unit: str) -> Formatter | None:
    if unit == "percentunit":
        return PercentFormatter(1.0)
    if unit in ("s", "bytes"):
        return EngFormatter(unit="s" if unit == "s" else "B")
    return None


def _right_axis_refs(panel: dict[str, Any]) -> dict[str, str]:
    """refId -> unit for the series a ``byFrameRefID`` override puts on the right-hand axis."""
    out = {}
    for o in panel.get("fieldConfig", {}).get("overrides", []):
        props = {p["id"]: p.get("value") for p in o["properties"]}
        if o["matcher"]["id"] == "byFrameRefID" and props.get("custom.axisPlacement") == "right":
            out[o["matcher"]["options"]] = str(props.get("unit", ""))
    return out


def _draw_stat(ax: Axes, unit: str, data: list[tuple[PanelTarget, list[Any]]]) -> None:
    last = [ys[np.isfinite(ys)][-1] for _, series in data for _, _, ys in series if np.isfinite(ys).any()]
    value = sum(last)
    text = f"{value:.1%}" if unit == "percentunit" else f"{value:.3g}" + (" req/s" if unit == "reqps" else "")
    ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=16, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_panel(ax: Axes, panel: dict[str, Any], data: list[tuple[PanelTarget, list[Any]]], ex: Any) -> None:
    ax.set_title(panel["title"], fontsize=8, loc="left")
    ax.tick_params(labelsize=6)
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    if panel["type"] == "stat":
        _draw_stat(ax, unit, data)
        return
    if panel["type"] == "heatmap":
        _draw_heatmap(ax, data[0][1])
        return
    right = _right_axis_refs(panel)
    twin = ax.twinx() if right else None
    handles = []
    for i, (t, series) in enumerate(data):
        target_ax = twin if twin is not None and t.ref_id in right else ax
        for j, (label, ts, ys) in enumerate(series[:8]):
            style = "--" if target_ax is twin else "-"
            (line,) = target_ax.plot(ts, ys, style, linewidth=0.9, label=label, color=f"C{(i * 8 + j) % 10}")
            handles.append(line)
    if twin is not None:
        twin.tick_params(labelsize=6)
        fmt = _formatter(next(iter(right.values())))
        if fmt is not None:
            twin.yaxis.set_major_formatter(fmt)
    ts, ys = ex
    if len(ts) > MAX_EXEMPLARS:  # Grafana draws them all; a sample keeps the picture readable and small
        keep = np.linspace(0, len(ts) - 1, MAX_EXEMPLARS).astype(int)
        ts, ys = ts[keep], ys[keep]
    if len(ts):
        handles.append(ax.scatter(ts, ys, s=3, marker="D", color="magenta", zorder=3, label="exemplars"))
    if handles:
        ax.legend(handles=handles, fontsize=5, loc="upper left", ncol=2, frameon=False)
    fmt = _formatter(unit)
    if fmt is not None:
        ax.yaxis.set_major_formatter(fmt)
    y_min = panel.get("fieldConfig", {}).get("defaults", {}).get("min")
    if y_min is not None:
        for a in (ax, twin):
            if a is not None:
                top = a.get_ylim()[1]
                a.set_ylim(y_min, top + 0.1 * (top - y_min))
    ax.grid(alpha=0.3)


def render(prom: PrometheusServer, dashboard: dict[str, Any], start: float, end: float, out: Path) -> None:
    targets = panel_targets(dashboard)
    by_panel: dict[int, list[PanelTarget]] = defaultdict(list)
    for t in targets:
        by_panel[t.panel_id].append(t)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, height * GRID_ROW_INCHES), dpi=60)
    grid = fig.add_gridspec(height, 24, hspace=0, wspace=3, left=0.04, right=0.96, top=0.97, bottom=0.02)
    fig.suptitle(
        f"{dashboard['title']}: every panel's queries through Prometheus, last {end - start:.0f} s of "
        "synthetic traffic (x: seconds before now; magenta: exemplars)",
        fontsize=10,
    )
    for p in panels:
        g = p["gridPos"]
        # The panel's first grid row is left for its title (and the x tick labels of the panel above).
        ax = fig.add_subplot(grid[g["y"] + 1 : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        data = [(t, _series(prom, t, start, end)) for t in by_panel[p["id"]]]
        ex_ts, ex_ys = [], []
        for t in by_panel[p["id"]]:
            if t.exemplar:
                a, b = _exemplars(prom, t, start, end)
                ex_ts.append(a)
                ex_ys.append(b)
        ex = (np.concatenate(ex_ts), np.concatenate(ex_ys)) if ex_ts else (np.array([]), np.array([]))
        order = np.argsort(ex[0], kind="stable")
        ex = (ex[0][order], ex[1][order])
        _draw_panel(ax, p, data, ex)
    fig.savefig(out, dpi=60, pil_kwargs={"optimize": True})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the dashboard preview PNG from a real Prometheus.")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long traffic flows before drawing")
    parser.add_argument("--out", type=Path, default=PREVIEW)
    args = parser.parse_args(argv)
    binary = prometheus_binary()
    if binary is None:
        parser.error("no prometheus binary on PATH (Debian: apt-get install prometheus)")
    dashboard = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    traffic = SyntheticTraffic(seed=1)
    with (
        synthetic_sidecar(traffic) as target,
        tempfile.TemporaryDirectory() as tmp,
        running_prometheus(binary, Path(tmp), [target]) as prom,
    ):
        prom.wait_for_scrapes(2)
        time.sleep(WARMUP_S)
        start = time.time()
        time.sleep(args.seconds / 2)
        traffic.failure_rate *= 3  # the incident: more failing requests, more flags
        time.sleep(args.seconds / 2)
        render(prom, dashboard, start, time.time(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")  # CLI output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

# pyright: strict, reportUnknownMemberType=false
# (matplotlib's stubs leave **kwargs unannotated, so every Axes method is "partially unknown".)
"""The papers' three maps as PNG + JSON: trace maps, the feature alignment matrix, the generalization map.

Symbolic Residue §7 reads shells through three pictures:

* a **trace map** (§7.3): one prompt's feature activity over layers (y) × token positions (x), here
  drawn twice, as feature mass and as the transcoder's reconstruction error ratio, because where the
  CLT stops explaining the MLP is itself residue;
* the **feature alignment matrix** (§7.4): how strongly each of the top features responds to each
  shell, here as a z-score against the benign controls so "strong" means "unlike ordinary prompts";
* the **generalization map** (§7.2): how often each shell's fingerprint fires on every shell family
  and on the controls; the diagonal (a fingerprint on its own family) should be high, the rest low.

Inputs are plain arrays + labels that the caller computes, so this module knows nothing about models or
transcoders. Every map is written twice: the PNG for people and a JSON with the exact numbers drawn
(rounded to 6 digits, NaN-free, one matrix row per line) for tests and diffs. Figures are built with
:class:`matplotlib.figure.Figure` on an Agg canvas, never through pyplot, so drawing leaves no global
state behind and is safe off the main thread.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.shells.catalog import CONTROLS_ID

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
"""Any real-valued array; the dataclasses store a read-only float64 copy."""

DPI = 100
MAX_X_TICKS = 40
"""A trace map labels every n-th token once T exceeds this, so labels never overlap."""
MAX_Y_TICKS = 24
_MAX_LABEL = 28
"""Row/column labels (shell ids, feature keys) longer than this are cut with "…"."""
_MAX_TOKEN = 16
"""Token tick labels are shorter: up to 40 of them share the x axis."""
_MAX_WIDTH_IN = 22.0
_MAX_HEIGHT_IN = 16.0


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class TraceMap:
    """Layer × position heat maps of one prompt (one shell instance): feature mass and CLT error ratio."""

    title: str
    """Figure title, e.g. "v1.MEMTRACE"."""
    tokens: tuple[str, ...]
    """(T,) token strings for the x axis."""
    mass: Array
    """(L, T) feature mass (sum of activations) per layer and position."""
    error_ratio: Array
    """(L, T) reconstruction error ratio ‖y − ŷ‖ / ‖y‖ per layer and position, ≥ 0 (0 = perfect)."""
    control_mass: Array | None = None
    """(L,) mean mass per layer over control prompts, drawn beside the map when given."""
    control_error_ratio: Array | None = None
    """(L,) mean error ratio per layer over control prompts."""

    def __post_init__(self) -> None:
        tokens = tuple(self.tokens)
        if not all(isinstance(t, str) for t in tokens):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidInput("TraceMap.tokens: expected a sequence of str")
        mass = _matrix("TraceMap.mass", self.mass)
        L, T = mass.shape
        err = _matrix("TraceMap.error_ratio", self.error_ratio, shape=(L, T), like="mass")
        if (err < 0).any():
            raise InvalidInput("TraceMap.error_ratio: expected values ≥ 0 (a ratio of norms)")
        if len(tokens) != T:
            raise InvalidInput(f"TraceMap.tokens: expected {T} tokens (mass is {L}×{T}), got {len(tokens)}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "mass", mass)
        object.__setattr__(self, "error_ratio", err)
        for name in ("control_mass", "control_error_ratio"):
            value: Array | None = getattr(self, name)
            if value is not None:
                vec = _vector(f"TraceMap.{name}", value, L)
                if name == "control_error_ratio" and (vec < 0).any():
                    raise InvalidInput("TraceMap.control_error_ratio: expected values ≥ 0")
                object.__setattr__(self, name, vec)

    @property
    def shape(self) -> tuple[int, int]:
        """(L, T)."""
        L, T = self.mass.shape
        return L, T


@dataclass(frozen=True, slots=True)
class AlignmentMatrix:
    """Feature alignment matrix: top features × shells, activation relative to controls."""

    features: tuple[str, ...]
    """(N,) row labels, e.g. "L12/F345"."""
    shells: tuple[str, ...]
    """(S,) column labels."""
    values: Array
    """(N, S) e.g. Cohen's d of each feature: (mean in shell − mean in controls) / pooled SD."""

    def __post_init__(self) -> None:
        features = _labels("AlignmentMatrix.features", self.features)
        shells = _labels("AlignmentMatrix.shells", self.shells)
        values = _matrix(
            "AlignmentMatrix.values",
            self.values,
            shape=(len(features), len(shells)),
            like="(features, shells)",
        )
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "shells", shells)
        object.__setattr__(self, "values", values)


@dataclass(frozen=True, slots=True)
class GeneralizationMap:
    """Each shell's fingerprint scored on every shell family and on the controls.

    The diagonal is every cell whose fingerprint name equals the family name (a fingerprint is
    registered under its shell's id), so rows and columns need not be in the same order.
    """

    fingerprints: tuple[str, ...]
    """(R,) row labels (fingerprint names)."""
    families: tuple[str, ...]
    """(C,) column labels (shell families + "controls")."""
    match_rate: Array
    """(R, C) fraction of the family's prompts the fingerprint matched, in [0, 1]."""

    def __post_init__(self) -> None:
        rows = _labels("GeneralizationMap.fingerprints", self.fingerprints)
        cols = _labels("GeneralizationMap.families", self.families)
        rate = _matrix(
            "GeneralizationMap.match_rate",
            self.match_rate,
            shape=(len(rows), len(cols)),
            like="(fingerprints, families)",
        )
        if ((rate < 0) | (rate > 1)).any():
            raise InvalidInput(
                "GeneralizationMap.match_rate: expected values in [0, 1], "
                f"got [{rate.min():g}, {rate.max():g}]"
            )
        object.__setattr__(self, "fingerprints", rows)
        object.__setattr__(self, "families", cols)
        object.__setattr__(self, "match_rate", rate)

    @property
    def diagonal(self) -> tuple[tuple[int, int], ...]:
        """(row, column) of every fingerprint scored on its own family."""
        col = {f: j for j, f in enumerate(self.families)}
        return tuple((i, col[f]) for i, f in enumerate(self.fingerprints) if f in col)


# ---------------------------------------------------------------- alignment values


def alignment_values(
    shell_acts: Mapping[str, Array],
    control_acts: Array,
    keys: Sequence[str],
    top: int = 30,
    eps: float = 1e-6,
) -> AlignmentMatrix:
    """Standardise every feature column's shell-vs-controls difference and keep the ``top`` most
    shell-specific ones.

    ``shell_acts[name]`` is (n_s, M): one row per prompt of that shell; ``control_acts`` is (n_c, M) with
    n_c ≥ 2; ``keys`` is (M,) feature labels. value[m, s] = (mean_s[m] − mean_c[m]) / (pooled SD[m] + eps),
    Cohen's d with the pooled sample SD of shell and controls (the controls' SD alone when n_s = 1). The
    pooled SD keeps features that never fire in the controls (SD 0 there) on a readable scale. The kept
    columns are the ``top`` with the largest max |value| over shells (ties → lower column index). Rows
    are grouped by the shell they peak on (argmax |value|, in the mapping's order), then by the signed
    peak value, descending, then by column index, so each shell reads as a block of its own features:
    excited ones first, suppressed ones last.
    """
    if not shell_acts:
        raise InvalidInput("shell_acts: expected at least one shell")
    if top < 1:
        raise InvalidInput(f"top: expected ≥ 1, got {top}")
    if not (eps > 0 and math.isfinite(eps)):
        raise InvalidInput(f"eps: expected a finite value > 0, got {eps}")
    names = _labels("shell_acts keys", tuple(shell_acts))
    labels = _labels("keys", tuple(keys))
    M = len(labels)
    ctrl = _matrix("control_acts", control_acts, shape=(None, M), like="(n_c, len(keys))")
    if ctrl.shape[0] < 2:
        raise InvalidInput(
            f"control_acts: expected ≥ 2 control prompts (rows) for a std, got {ctrl.shape[0]}"
        )
    mean_c = ctrl.mean(axis=0)  # (M,)
    std_c = ctrl.std(axis=0, ddof=1)  # (M,)
    cols: list[Array] = []
    for name in names:
        acts = _matrix(f"shell_acts[{name!r}]", shell_acts[name], shape=(None, M), like="(n_s, len(keys))")
        n_s, n_c = acts.shape[0], ctrl.shape[0]
        var_s = acts.var(axis=0, ddof=1) if n_s > 1 else np.zeros(M)
        pooled = np.sqrt(((n_s - 1) * var_s + (n_c - 1) * std_c**2) / (n_s + n_c - 2))  # (M,)
        cols.append((acts.mean(axis=0) - mean_c) / (pooled + eps))
    z = np.stack(cols, axis=1)  # (M, S)

    score = np.abs(z).max(axis=1)  # (M,)
    kept = np.argsort(-score, kind="stable")[: min(top, M)]  # stable → ties keep the lower index first
    peak = np.abs(z[kept]).argmax(axis=1)  # (N,) shell each kept feature peaks on
    peak_value = z[kept, peak]  # (N,) signed
    order = np.lexsort((kept, -peak_value, peak))  # last key is primary
    rows = kept[order]
    return AlignmentMatrix(
        features=tuple(labels[int(i)] for i in rows),
        shells=names,
        values=z[rows],
    )


# ---------------------------------------------------------------- drawing


def draw_trace_map(m: TraceMap, path: Path) -> Path:
    """Two stacked heat maps (mass on top, error ratio below), layer 0 at the bottom, token on x.

    A side panel beside each map plots the prompt's per-layer mean over positions and, when given, the
    controls' per-layer mean, so a layer that is unusual for this prompt stands out. The x axis labels
    every n-th token once T > 40. Writes ``path`` (PNG) and ``path.with_suffix(".json")``; returns
    ``path``.
    """
    png = _check_png_path(path)
    L, T = m.shape
    every = max(1, math.ceil(T / MAX_X_TICKS))
    panel_h = min(max(1.6, 1.0 + 0.12 * L), 6.0)
    main_w = min(max(4.0, 1.5 + 0.1 * T), _MAX_WIDTH_IN - 3.0)
    label_h = 0.075 * min(_MAX_TOKEN, _longest(m.tokens))  # x labels are rotated 90°
    fig = _figure(main_w + 3.0, min(2 * panel_h + 1.4 + label_h, _MAX_HEIGHT_IN))
    try:
        grid = fig.add_gridspec(2, 3, width_ratios=(main_w, 0.2, 1.6))
        means = (m.mass.mean(axis=1), m.error_ratio.mean(axis=1))  # (L,) each
        controls = (m.control_mass, m.control_error_ratio)
        names = ("feature mass", "error ratio")
        cmaps = ("viridis", "magma")
        top_ax = None
        for row, (data, mean, ctrl, name, cmap) in enumerate(
            zip((m.mass, m.error_ratio), means, controls, names, cmaps, strict=True)
        ):
            ax = fig.add_subplot(grid[row, 0], sharex=top_ax)
            top_ax = top_ax or ax
            vmin = 0.0 if row == 1 else None  # 0 = perfect reconstruction anchors the error scale
            # A few extreme cells (the first token's massive activations) would wash out the rest: the
            # colour scale stops at the 99th percentile and the colorbar shows the clipping.
            vmax = float(np.percentile(data, 99))
            clipped = bool(data.max() > vmax)
            im = ax.imshow(data, origin="lower", aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin,
                           vmax=vmax)  # fmt: skip
            ax.set_ylabel("layer")
            ax.set_yticks(*_ticks([str(i) for i in range(L)], MAX_Y_TICKS))
            ax.set_title(f"{m.title} — {name}" if row == 0 else name, fontsize=10, loc="left")
            fig.colorbar(
                im, cax=fig.add_subplot(grid[row, 1]), label=name, extend="max" if clipped else "neither"
            )
            side = fig.add_subplot(grid[row, 2], sharey=ax)
            layers = np.arange(L)
            side.plot(mean, layers, marker=".", color="tab:blue", label="prompt")
            if ctrl is not None:
                side.plot(ctrl, layers, marker=".", linestyle="--", color="tab:gray", label="controls")
            side.set_xlabel("mean over positions", fontsize=8)
            side.tick_params(labelleft=False, labelsize=7)
            side.legend(fontsize=7, loc="best")
            if row == 0:
                ax.tick_params(labelbottom=False)
            else:
                pos, text = _ticks(m.tokens, MAX_X_TICKS, _MAX_TOKEN)
                ax.set_xticks(pos, text, rotation=90, fontsize=7)
                ax.set_xlabel("token position" + (f" (1 in {every} labelled)" if every > 1 else ""))
        size = _save(fig, png)
    finally:
        fig.clear()
    _write_json(
        png,
        {
            "kind": "trace_map",
            "title": m.title,
            "tokens": list(m.tokens),
            "n_layers": L,
            "n_tokens": T,
            "tick_every": every,
            "size_px": size,
            "mass": _num(m.mass),
            "error_ratio": _num(m.error_ratio),
            "mass_layer_mean": _num(means[0]),
            "error_ratio_layer_mean": _num(means[1]),
            "control_mass": None if m.control_mass is None else _num(m.control_mass),
            "control_error_ratio": None if m.control_error_ratio is None else _num(m.control_error_ratio),
        },
    )
    return png


def draw_alignment_matrix(m: AlignmentMatrix, path: Path) -> Path:
    """Features (rows) × shells (columns), diverging colours centred at 0 with symmetric limits.

    Thin lines separate runs of rows that peak on different shells (the grouping
    :func:`alignment_values` produces). Writes ``path`` (PNG) and its JSON; returns ``path``.
    """
    png = _check_png_path(path)
    N, S = m.values.shape
    vmax = float(np.abs(m.values).max()) or 1.0  # all-zero → ±1 so the norm stays valid
    label_w = 0.065 * min(_MAX_LABEL, _longest(m.features))
    fig = _figure(
        min(2.5 + label_w + 0.55 * S, _MAX_WIDTH_IN),
        min(1.8 + 0.065 * min(_MAX_LABEL, _longest(m.shells)) + 0.22 * N, _MAX_HEIGHT_IN),
    )
    try:
        ax = fig.add_subplot()
        im = ax.imshow(m.values, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_xticks(*_ticks(m.shells, len(m.shells)), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(*_ticks(m.features, len(m.features)), fontsize=7)
        ax.set_xlabel("shell")
        ax.set_ylabel("feature")
        ax.set_title("Feature alignment matrix", fontsize=10)
        peak = np.abs(m.values).argmax(axis=1)  # (N,)
        for i in np.flatnonzero(peak[1:] != peak[:-1]).tolist():
            ax.axhline(i + 0.5, color="black", linewidth=0.6)
        fig.colorbar(im, ax=ax, label="Cohen's d vs controls")
        size = _save(fig, png)
    finally:
        fig.clear()
    _write_json(
        png,
        {
            "kind": "alignment_matrix",
            "features": list(m.features),
            "shells": list(m.shells),
            "vmax": _num(vmax),
            "size_px": size,
            "values": _num(m.values),
        },
    )
    return png


def draw_generalization_map(m: GeneralizationMap, path: Path) -> Path:
    """Fingerprints (rows) × families (columns), 0–100 %, every cell annotated, the diagonal outlined.

    A vertical line sets the controls column apart. Writes ``path`` (PNG) and its JSON; returns ``path``.
    """
    png = _check_png_path(path)
    R, C = m.match_rate.shape
    fig = _figure(
        min(2.8 + 0.065 * min(_MAX_LABEL, _longest(m.fingerprints)) + 0.8 * C, _MAX_WIDTH_IN),
        min(1.8 + 0.065 * min(_MAX_LABEL, _longest(m.families)) + 0.5 * R, _MAX_HEIGHT_IN),
    )
    try:
        ax = fig.add_subplot()
        im = ax.imshow(m.match_rate, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(R):
            for j in range(C):
                v = float(m.match_rate[i, j])
                ax.text(j, i, f"{100 * v:.0f}%", ha="center", va="center", fontsize=8,
                        color="white" if v > 0.6 else "black")  # fmt: skip
        for i, j in m.diagonal:
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:orange", linewidth=2.5)
            )
        for j, f in enumerate(m.families):
            if f == CONTROLS_ID and j > 0:
                ax.axvline(j - 0.5, color="black", linewidth=1.2)
        ax.set_xticks(*_ticks(m.families, C), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(*_ticks(m.fingerprints, R), fontsize=8)
        ax.set_xlabel("prompt family")
        ax.set_ylabel("fingerprint")
        ax.set_title("Generalization map (match rate)", fontsize=10)
        fig.colorbar(im, ax=ax, label="match rate")
        size = _save(fig, png)
    finally:
        fig.clear()
    _write_json(
        png,
        {
            "kind": "generalization_map",
            "fingerprints": list(m.fingerprints),
            "families": list(m.families),
            "diagonal": [list(d) for d in m.diagonal],
            "size_px": size,
            "match_rate": _num(m.match_rate),
        },
    )
    return png


# ---------------------------------------------------------------- helpers


def _matrix(
    name: str, value: object, shape: tuple[int | None, int] | None = None, like: str = ""
) -> npt.NDArray[np.float64]:
    """A read-only float64 copy of a non-empty, finite 2-D array; ``shape`` entries of None are free."""
    try:
        a = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{name}: expected a real-valued 2-D array") from e
    if a.ndim != 2 or a.size == 0:
        raise InvalidInput(f"{name}: expected a non-empty 2-D array, got shape {a.shape}")
    if shape is not None and any(w is not None and w != h for w, h in zip(shape, a.shape, strict=True)):
        want = "×".join("n" if w is None else str(w) for w in shape)
        raise InvalidInput(
            f"{name}: expected shape {want} {like}, got {a.shape[0]}×{a.shape[1]}".replace("  ", " ")
        )
    if not np.isfinite(a).all():
        raise InvalidInput(f"{name}: expected finite values, found NaN or inf")
    a.setflags(write=False)
    return a


def _vector(name: str, value: object, n: int) -> npt.NDArray[np.float64]:
    """A read-only float64 copy of a finite (n,) array."""
    try:
        a = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{name}: expected a real-valued 1-D array") from e
    if a.shape != (n,):
        raise InvalidInput(f"{name}: expected shape ({n},) (one value per layer), got {a.shape}")
    if not np.isfinite(a).all():
        raise InvalidInput(f"{name}: expected finite values, found NaN or inf")
    a.setflags(write=False)
    return a


def _labels(name: str, labels: Sequence[str]) -> tuple[str, ...]:
    """Non-empty, unique str labels as a tuple."""
    out = tuple(labels)
    if not out:
        raise InvalidInput(f"{name}: expected at least one label")
    if not all(isinstance(s, str) for s in out):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise InvalidInput(f"{name}: expected str labels")
    if len(set(out)) != len(out):
        dup = sorted({s for s in out if out.count(s) > 1})
        raise InvalidInput(f"{name}: expected unique labels, duplicated: {dup}")
    return out


def _check_png_path(path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidInput(f"path: expected a .png file (the JSON goes beside it), got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas: no pyplot, no global figure registry."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, png: Path) -> list[int]:
    """Write the PNG atomically (temp file + rename); return its [width, height] in pixels."""
    tmp = png.with_name(png.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    tmp.replace(png)
    with png.open("rb") as f:  # the IHDR chunk: Agg truncates fractional pixels, so read what it wrote
        w, h = struct.unpack(">II", f.read(24)[16:24])
    logger.debug("wrote %s (%d×%d px)", png, w, h)
    return [int(w), int(h)]


def _display(label: str, max_len: int = _MAX_LABEL) -> str:
    """A tick label that shows whitespace and never triggers mathtext ("$")."""
    s = label.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    s = "·" + s[1:] if s.startswith(" ") else s  # a token's leading space is information
    return s if len(s) <= max_len else s[: max_len - 1] + "…"


def _longest(labels: Sequence[str]) -> int:
    return max((len(s) for s in labels), default=0)


def _ticks(labels: Sequence[str], max_ticks: int, max_len: int = _MAX_LABEL) -> tuple[list[int], list[str]]:
    """Positions and display labels of every n-th label, n = ceil(len / max_ticks)."""
    every = max(1, math.ceil(len(labels) / max_ticks))
    pos = list(range(0, len(labels), every))
    return pos, [_display(labels[i], max_len) for i in pos]


def _num(a: Array | float) -> Any:
    """Floats (or nested lists of floats) rounded to 6 digits, for JSON."""
    return np.round(np.asarray(a, dtype=np.float64), 6).tolist()


def _write_json(png: Path, doc: dict[str, Any]) -> None:
    """Write ``png.with_suffix(".json")``: one key per line, one matrix row per line (diffable), no NaN."""
    lines: list[str] = []
    for key, value in doc.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n".join(f"    {json.dumps(r, allow_nan=False)}" for r in value)  # pyright: ignore[reportUnknownVariableType]
            text = f"[\n{rows}\n  ]"
        else:
            text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        lines.append(f"  {json.dumps(key)}: {text}")
    out = png.with_suffix(".json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    tmp.replace(out)

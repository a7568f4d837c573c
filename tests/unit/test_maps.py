"""shells/maps.py: each map writes a real PNG + a JSON of the numbers drawn; inputs are validated."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.shells.maps import (
    AlignmentMatrix,
    GeneralizationMap,
    TraceMap,
    alignment_values,
    draw_alignment_matrix,
    draw_generalization_map,
    draw_trace_map,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _no_nan(const: str) -> Any:
    raise AssertionError(f"JSON holds {const}")


def _check_png(path: Path, size_px: list[int]) -> None:
    """A PNG of exactly ``size_px`` (width, height) with more than one colour in it."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(path)  # (H, W, 4) floats
    assert img.shape[:2] == (size_px[1], size_px[0])
    assert img.shape[0] > 0 and img.shape[1] > 0
    flat = img.reshape(-1, img.shape[-1])
    assert (flat != flat[0]).any(), "image is a single flat colour"


def _load(png: Path) -> dict[str, Any]:
    doc = json.loads(png.with_suffix(".json").read_text(encoding="utf-8"), parse_constant=_no_nan)
    assert isinstance(doc, dict)
    return doc


def _trace(L: int = 6, T: int = 12, seed: int = 0, controls: bool = True) -> TraceMap:
    rng = np.random.default_rng(seed)
    return TraceMap(
        title="v1.MEMTRACE",
        tokens=tuple(f"tok{i}" for i in range(T)),
        mass=rng.gamma(2.0, 1.0, size=(L, T)),
        error_ratio=rng.uniform(0.0, 1.5, size=(L, T)),
        control_mass=rng.gamma(2.0, 1.0, size=L) if controls else None,
        control_error_ratio=rng.uniform(0.0, 1.0, size=L) if controls else None,
    )


# ---------------------------------------------------------------- trace map


def test_trace_map_writes_png_and_json_with_the_input_numbers(tmp_path: Path) -> None:
    """draw_trace_map makes parent dirs, writes a non-flat PNG of the stated size, JSON equal to the input."""
    m = _trace()
    png = draw_trace_map(m, tmp_path / "a" / "b" / "trace.png")
    assert png == tmp_path / "a" / "b" / "trace.png"
    doc = _load(png)
    _check_png(png, doc["size_px"])
    assert doc["kind"] == "trace_map" and doc["title"] == "v1.MEMTRACE"
    assert doc["tokens"] == list(m.tokens) and (doc["n_layers"], doc["n_tokens"]) == (6, 12)
    assert doc["tick_every"] == 1
    np.testing.assert_allclose(doc["mass"], m.mass, atol=1e-6)
    np.testing.assert_allclose(doc["error_ratio"], m.error_ratio, atol=1e-6)
    np.testing.assert_allclose(doc["mass_layer_mean"], m.mass.mean(axis=1), atol=1e-6)
    assert m.control_mass is not None and m.control_error_ratio is not None
    np.testing.assert_allclose(doc["control_mass"], m.control_mass, atol=1e-6)
    np.testing.assert_allclose(doc["control_error_ratio"], m.control_error_ratio, atol=1e-6)


def test_trace_map_without_controls_writes_null_controls(tmp_path: Path) -> None:
    """Controls are optional: the JSON then says null for them."""
    doc = _load(draw_trace_map(_trace(controls=False), tmp_path / "t.png"))
    assert doc["control_mass"] is None and doc["control_error_ratio"] is None


def test_trace_map_thins_ticks_for_200_tokens(tmp_path: Path) -> None:
    """T = 200 labels every 5th token, keeps the figure width capped, and odd tokens ($, newline) draw."""
    m = _trace(L=4, T=200)
    tokens = list(m.tokens)
    tokens[0], tokens[5], tokens[10] = "$x$", "\n", " a very long token indeed, longer than the cap"
    m = TraceMap(m.title, tuple(tokens), m.mass, m.error_ratio)
    png = draw_trace_map(m, tmp_path / "long.png")
    doc = _load(png)
    _check_png(png, doc["size_px"])
    assert doc["tick_every"] == 5 and doc["tokens"] == tokens
    assert doc["size_px"][0] <= 2200
    small = _load(draw_trace_map(_trace(L=4, T=12), tmp_path / "short.png"))
    assert small["size_px"][0] < doc["size_px"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"error_ratio": np.zeros((6, 11))}, "error_ratio: expected shape 6×12"),
        ({"tokens": ("a",) * 11}, "expected 12 tokens"),
        ({"mass": np.zeros((0, 12)), "error_ratio": np.zeros((0, 12))}, "non-empty"),
        ({"mass": np.zeros(12)}, "2-D"),
        ({"mass": np.full((6, 12), np.nan)}, "finite"),
        ({"error_ratio": np.full((6, 12), np.inf)}, "finite"),
        ({"error_ratio": -np.ones((6, 12))}, "≥ 0"),
        ({"control_mass": np.zeros(5)}, "control_mass: expected shape (6,)"),
        ({"control_error_ratio": np.array([np.nan] * 6)}, "finite"),
    ],
)
def test_trace_map_rejects_bad_input(change: dict[str, Any], message: str) -> None:
    """Mismatched (L, T) shapes, token counts, empty, NaN/inf, negative error ratios raise InvalidInput."""
    m = _trace()
    fields: dict[str, Any] = {
        "title": m.title,
        "tokens": m.tokens,
        "mass": m.mass,
        "error_ratio": m.error_ratio,
        "control_mass": m.control_mass,
        "control_error_ratio": m.control_error_ratio,
    } | change
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        TraceMap(**fields)


def test_trace_map_stores_read_only_float64_copies() -> None:
    """The frozen map copies its arrays: mutating the caller's array changes nothing drawn."""
    mass = np.ones((2, 3), dtype=np.float32)
    m = TraceMap("t", ("a", "b", "c"), mass, np.zeros((2, 3)))
    mass[0, 0] = 9.0
    assert m.mass.dtype == np.float64 and m.mass[0, 0] == 1.0
    assert not m.mass.flags.writeable


def test_draw_requires_a_png_path(tmp_path: Path) -> None:
    """The JSON goes beside the PNG, so a non-.png path is refused (it could collide with the JSON)."""
    with pytest.raises(InvalidInput, match=r"\.png"):
        draw_trace_map(_trace(), tmp_path / "trace.json")


# ---------------------------------------------------------------- alignment


def _planted() -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Noise everywhere; column 7 up in a, 20 up and 3 down in b, 11 up in c (z ≈ 5–8)."""
    rng = np.random.default_rng(1)
    M = 40
    control = rng.normal(0.0, 1.0, size=(60, M))
    shells = {name: rng.normal(0.0, 1.0, size=(12, M)) for name in ("a", "b", "c")}
    shells["a"][:, 7] += 5.0
    shells["b"][:, 20] += 8.0
    shells["b"][:, 3] -= 6.0
    shells["c"][:, 11] += 4.0
    return shells, control, [f"L0/F{i}" for i in range(M)]


def test_alignment_values_picks_planted_columns_with_sign_and_grouping() -> None:
    """The planted columns are the top 4, grouped by peak shell, excited before suppressed, signs kept."""
    shells, control, keys = _planted()
    m = alignment_values(shells, control, keys, top=4)
    assert m.shells == ("a", "b", "c")
    assert m.features == ("L0/F7", "L0/F20", "L0/F3", "L0/F11")
    assert m.values.shape == (4, 3)
    peaks = [(0, 0), (1, 1), (2, 1), (3, 2)]
    assert [m.values[r, c] > 3.0 for r, c in peaks] == [True, True, False, True]
    assert m.values[2, 1] < -3.0
    s, c = shells["b"][:, 20], control[:, 20]
    pooled = np.sqrt(((len(s) - 1) * s.var(ddof=1) + (len(c) - 1) * c.var(ddof=1)) / (len(s) + len(c) - 2))
    assert m.values[1, 1] == pytest.approx((s.mean() - c.mean()) / (pooled + 1e-6))


def test_alignment_values_keeps_all_columns_when_top_exceeds_m() -> None:
    """top larger than M keeps every column once."""
    shells, control, keys = _planted()
    m = alignment_values(shells, control, keys, top=100)
    assert sorted(m.features) == sorted(keys)


def test_alignment_values_breaks_ties_by_column_index() -> None:
    """Columns with equal max |value| are kept in column order (the lower index wins the last slot)."""
    control = np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])  # mean 1, std √2 in every column
    shell = np.array([[3.0, 1.0, 3.0]])  # columns 0 and 2 tie
    m = alignment_values({"s": shell}, control, ["c0", "c1", "c2"], top=1)
    assert m.features == ("c0",)
    m = alignment_values({"s": shell}, control, ["c0", "c1", "c2"], top=2)
    assert m.features == ("c0", "c2")


@pytest.mark.parametrize(
    ("shells", "control", "keys", "top", "message"),
    [
        ({"a": np.zeros((3, 4))}, np.zeros((5, 4)), ["k"] * 3 + ["z"], 2, "unique"),
        ({"a": np.zeros((3, 4))}, np.zeros((5, 4)), ["a", "b", "c"], 2, r"control_acts: expected shape n×3"),
        (
            {"a": np.zeros((3, 5))},
            np.zeros((5, 4)),
            ["a", "b", "c", "d"],
            2,
            r"shell_acts\['a'\]: expected shape n×4",
        ),
        ({"a": np.zeros((3, 4))}, np.zeros(4), ["a", "b", "c", "d"], 2, "2-D"),
        ({"a": np.zeros((0, 4))}, np.zeros((5, 4)), ["a", "b", "c", "d"], 2, "non-empty"),
        ({}, np.zeros((5, 4)), ["a", "b", "c", "d"], 2, "at least one shell"),
        ({"a": np.zeros((3, 4))}, np.zeros((1, 4)), ["a", "b", "c", "d"], 2, "≥ 2 control"),
        ({"a": np.full((3, 4), np.nan)}, np.zeros((5, 4)), ["a", "b", "c", "d"], 2, "finite"),
        ({"a": np.zeros((3, 4))}, np.zeros((5, 4)), ["a", "b", "c", "d"], 0, "top"),
    ],
)
def test_alignment_values_rejects_bad_input(
    shells: dict[str, np.ndarray], control: np.ndarray, keys: list[str], top: int, message: str
) -> None:
    """Shape mismatches, empty input, NaN, too few controls, duplicate keys, top < 1 raise InvalidInput."""
    with pytest.raises(InvalidInput, match=message):
        alignment_values(shells, control, keys, top=top)


def test_alignment_matrix_writes_png_and_json(tmp_path: Path) -> None:
    """draw_alignment_matrix writes a non-flat PNG and a JSON equal to the matrix, vmax = max |value|."""
    shells, control, keys = _planted()
    m = alignment_values(shells, control, keys, top=10)
    png = draw_alignment_matrix(m, tmp_path / "align.png")
    doc = _load(png)
    _check_png(png, doc["size_px"])
    assert doc["kind"] == "alignment_matrix"
    assert doc["features"] == list(m.features) and doc["shells"] == ["a", "b", "c"]
    np.testing.assert_allclose(doc["values"], m.values, atol=1e-6)
    assert doc["vmax"] == pytest.approx(np.abs(m.values).max(), abs=1e-6)


def test_alignment_matrix_rejects_mismatched_values() -> None:
    """values must be (len(features), len(shells))."""
    with pytest.raises(InvalidInput, match="expected shape 2×3"):
        AlignmentMatrix(("f0", "f1"), ("a", "b", "c"), np.zeros((3, 2)))


# ---------------------------------------------------------------- generalization


def test_generalization_map_writes_png_and_json_with_diagonal(tmp_path: Path) -> None:
    """draw_generalization_map writes a non-flat PNG, a JSON equal to the rates; diagonal = name matches."""
    rate = np.array([[0.9, 0.1, 0.0, 0.05], [0.2, 0.75, 0.3, 0.0], [1.0, 0.0, 0.5, 0.12]])
    m = GeneralizationMap(("v1", "v2", "v9"), ("v2", "v1", "v3", "controls"), rate)
    png = draw_generalization_map(m, tmp_path / "gen.png")
    doc = _load(png)
    _check_png(png, doc["size_px"])
    assert doc["kind"] == "generalization_map"
    assert doc["fingerprints"] == ["v1", "v2", "v9"] and doc["families"] == ["v2", "v1", "v3", "controls"]
    assert doc["diagonal"] == [[0, 1], [1, 0]]
    np.testing.assert_allclose(doc["match_rate"], rate, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.01, 1.01, np.nan, np.inf])
def test_generalization_map_rejects_out_of_range_rates(bad: float) -> None:
    """match_rate outside [0, 1] (or NaN/inf) raises InvalidInput."""
    rate = np.full((2, 2), 0.5)
    rate[1, 0] = bad
    with pytest.raises(InvalidInput, match="match_rate"):
        GeneralizationMap(("a", "b"), ("a", "b"), rate)


def test_generalization_map_rejects_mismatched_shape_and_empty_labels() -> None:
    """match_rate must be (R, C) and both label tuples non-empty."""
    with pytest.raises(InvalidInput, match="expected shape 2×3"):
        GeneralizationMap(("a", "b"), ("a", "b", "c"), np.zeros((2, 2)))
    with pytest.raises(InvalidInput, match="at least one label"):
        GeneralizationMap((), ("a",), np.zeros((0, 1)))


def test_drawing_leaves_no_pyplot_figures(tmp_path: Path) -> None:
    """Maps are drawn on bare Figures: nothing is left in pyplot's global figure registry."""
    draw_generalization_map(GeneralizationMap(("a",), ("a",), np.ones((1, 1))), tmp_path / "g.png")
    plt = sys.modules.get("matplotlib.pyplot")
    assert plt is None or plt.get_fignums() == []

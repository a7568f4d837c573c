"""The dependency rule (DESIGN.md §2, STYLE.md rule 1): detectors/ and shells/ are pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BANNED = ("grpc", "redis", "prometheus_client", "vllm", "residue_monitor.service", "service", "tests")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return found


def _violations(folder: Path) -> list[str]:
    bad = []
    for f in sorted(folder.rglob("*.py")):
        for line, mod in _imports(f):
            if any(mod == b or mod.startswith(b + ".") for b in BANNED):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("folder", ["detectors", "shells"])
def test_pure_packages_import_nothing_banned(folder: str) -> None:
    """detectors/ and shells/ never import grpc, redis, prometheus_client, vllm, service or tests."""
    assert _violations(ROOT / folder) == []


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    """The checker itself fails on a planted banned import (so the test above can fail)."""
    (tmp_path / "bad.py").write_text("import os\nfrom redis import Redis\nimport vllm.config\n")
    (tmp_path / "ok.py").write_text("import torch\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert [v.split(" imports ")[1] for v in _violations(tmp_path)] == ["redis", "vllm.config"]
    finally:
        ROOT = saved

"""deploy/prometheus: the config, recording and alert rules pass promtool, and match the exporter.

promtool ships in Debian's ``prometheus`` package (``apt-get install prometheus``); the promtool tests
skip without it, the name cross-checks below run everywhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from residue_monitor.service.exporter import StatsAccumulator, register_collectors

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM_DIR / "tests").glob("*.yml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH: install Debian's `prometheus` package to run it"
)

# PromQL identifiers: metric names, recorded series (with colons), functions, keywords, label names.
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=300, check=False
    )


def load(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def rules() -> Iterator[dict[str, Any]]:
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            yield from group["rules"]


def emitted_sample_names() -> set[str]:
    """Every sample name a fresh sidecar registry exposes (all series exist from the first scrape)."""
    registry = CollectorRegistry()
    register_collectors(registry, StatsAccumulator(["v1"]).snapshot)
    return {s.name for fam in registry.collect() for s in fam.samples}


def test_layout() -> None:
    """The deploy folder has the config, both rule files and promtool test files."""
    assert (PROM_DIR / "prometheus.yml").is_file()
    assert [p.name for p in RULE_FILES] == ["residue-alerts.yml", "residue-recording.yml"]
    assert TEST_FILES


def test_rule_metric_names_are_emitted_by_exporter() -> None:
    """Every residue_* name a rule reads is one the exporter emits, and every recorded series a rule
    reads is defined: a renamed metric breaks this test, not a silent alert."""
    emitted = emitted_sample_names()
    recorded = {r["record"] for r in rules() if "record" in r}
    used_raw: set[str] = set()
    for rule in rules():
        names = set(_IDENT.findall(_STRING.sub("", rule["expr"])))
        for name in names:
            if ":" in name:
                assert name in recorded, f"{rule.get('alert') or rule.get('record')} reads undefined {name}"
            elif name.startswith("residue_"):
                assert name in emitted, f"{rule.get('alert') or rule.get('record')} reads unknown {name}"
                used_raw.add(name)
    # The cross-check is not vacuous: the rules read the main families.
    assert {"residue_flags_total", "residue_error_ratio_sum", "residue_store_backlog"} <= used_raw


def test_promtool_inputs_use_emitted_names() -> None:
    """The series fed to promtool tests are real exporter names (or `up`), so the tests model reality."""
    emitted = emitted_sample_names() | {"up"}
    for path in TEST_FILES:
        for case in load(path)["tests"]:
            for series in case["input_series"]:
                assert series["series"].split("{", 1)[0] in emitted, (path.name, series["series"])


def test_every_alert_has_firing_and_quiet_cases() -> None:
    """Each alert rule has at least one promtool case where it fires and one where it stays quiet."""
    alerts = {r["alert"] for r in rules() if "alert" in r}
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for case in load(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts, "no alert rules found"
    assert alerts - firing == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a quiet case"
    assert (firing | quiet) <= alerts, "tests name alerts that do not exist"


@needs_promtool
def test_promtool_check_config() -> None:
    """prometheus.yml is a valid config and the rule files it names load."""
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    """Both rule files parse and every expression is valid PromQL."""
    result = promtool("check", "rules", *(str(p.relative_to(PROM_DIR)) for p in RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    """The promtool unit tests (firing and quiet cases for every alert) all pass."""
    result = promtool("test", "rules", *(str(p.relative_to(PROM_DIR)) for p in TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES)

"""deploy/alertmanager: the routing example passes amtool, and every alert rule reaches the receiver it
is meant for (`amtool config routes test`), so a renamed alert or a changed severity cannot silently
land in the wrong queue.

amtool ships in Debian's ``prometheus-alertmanager`` package; the amtool tests skip without it, the
cross-checks against the rule files run everywhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "rules" / "residue-alerts.yml"
AMTOOL = shutil.which("amtool")
needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool not on PATH: install Debian's `prometheus-alertmanager` package to run it"
)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def expected_receiver(rule: dict[str, Any]) -> str:
    """The routing policy the config implements (its header comment)."""
    if rule["labels"]["severity"] == "critical":
        return "residue-pager"
    if rule["alert"] == "ResidueFingerprintFlagRateHigh":
        return "residue-model-quality"
    return "residue-tickets"


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert AMTOOL is not None
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_amtool
def test_config_passes_amtool() -> None:
    """`amtool check-config` accepts the example (routes, inhibit rule, receivers)."""
    res = amtool("check-config", str(CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_amtool
@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_routes_to_its_receiver(rule: dict[str, Any]) -> None:
    """Each alert rule, with its own labels (and a fingerprint label where it has one), resolves to exactly
    the intended receiver."""
    labels = [f"alertname={rule['alert']}", *(f"{k}={v}" for k, v in rule["labels"].items())]
    if rule["alert"] == "ResidueFingerprintFlagRateHigh":
        labels.append("fingerprint=v1.MEMTRACE")
    want = expected_receiver(rule)
    res = amtool("config", "routes", "test", f"--config.file={CONFIG}", f"--verify.receivers={want}", *labels)
    assert res.returncode == 0, f"{rule['alert']} → {res.stdout.strip()} (wanted {want})"


@needs_amtool
def test_a_wrong_expectation_fails() -> None:
    """The routing check can fail: a warning alert is not paged."""
    res = amtool("config", "routes", "test", f"--config.file={CONFIG}", "--verify.receivers=residue-pager",
                 "alertname=ResidueStoreErrors", "severity=warning")  # fmt: skip
    assert res.returncode != 0 and "residue-tickets" in res.stdout


def test_inhibition_and_receivers_match_the_rules() -> None:
    """The inhibit rule names alerts that exist, with a label both sides carry; every receiver a route
    names is defined, and every defined receiver is used; Prometheus sends its alerts to Alertmanager."""
    cfg = yaml.safe_load(CONFIG.read_text())
    names = {r["alert"] for r in alert_rules()}
    for inh in cfg["inhibit_rules"]:
        for m in inh["source_matchers"] + inh["target_matchers"]:
            key, _, value = (part.strip() for part in m.partition("=~" if "=~" in m else "="))
            assert key == "alertname"
            pattern = value.strip('"')
            assert any(re.fullmatch(pattern, n) for n in names), pattern
        assert inh["equal"] == ["instance"]
    defined = {r["name"] for r in cfg["receivers"]}
    used = {cfg["route"]["receiver"], *(r["receiver"] for r in cfg["route"]["routes"])}
    assert used == defined
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]

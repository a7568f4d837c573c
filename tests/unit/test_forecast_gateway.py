"""The forecast gateway's pure parts (examples/forecast_gateway.py): reading a forecast off a GetResidue
answer, the policy decision, thresholds at a false-positive rate, and the tokens-saved / answers-lost
report. No servers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from examples import forecast_gateway as gw
from residue_monitor.detectors import evaluation as ev
from residue_monitor.service._proto import residue_pb2 as pb


def _run(
    i: int, outcome: str, p: float | None, after: int | None = 0, out: int = 10, flagged: bool = False
) -> gw.ItemRun:
    return gw.ItemRun(id=str(i), task="t", outcome=outcome, request_id=f"cmpl-{i}", probability=p,
                      flagged=flagged, threshold=0.5, reason="" if p is not None else "none",
                      output_tokens=out, tokens_after_forecast=after, latency_ms=None)  # fmt: skip


def _score_record(p: float, flagged: bool, complete: bool = False) -> pb.ResidueRecord:
    rec = pb.ResidueRecord(request_id="cmpl-1", complete=complete)
    s = rec.prefill_forecast.score
    s.probability, s.threshold, s.flagged, s.forecast_id = p, 0.4, flagged, "abcd"
    s.prefill_time.seconds, s.prefill_time.nanos = 100, 500_000_000
    s.scored_time.seconds, s.scored_time.nanos = 100, 510_000_000
    return rec


# ---------------------------------------------------------------------------------------------- reading
def test_a_scored_record_gives_its_probability_and_prefill_time() -> None:
    """The score's probability, threshold, flag, id and prefill time are read; latency = readable −
    prefill time."""
    fc = gw.forecast_from_record(_score_record(0.7, True), readable_time=100.52)
    assert fc is not None and fc.available
    assert (fc.probability, fc.threshold, fc.flagged, fc.forecast_id) == (0.7, 0.4, True, "abcd")
    assert fc.prefill_time == 100.5 and fc.latency_s == pytest.approx(0.02)
    assert fc.scored_time == pytest.approx(100.51)


def test_unavailable_reason_is_no_forecast() -> None:
    """``unavailable_reason`` becomes a forecast without probability that carries the reason."""
    rec = pb.ResidueRecord(request_id="cmpl-1")
    rec.prefill_forecast.unavailable_reason = "no forecast model is loaded"
    fc = gw.forecast_from_record(rec, 1.0)
    assert fc is not None and not fc.available and fc.reason == "no forecast model is loaded"
    assert fc.latency_s is None


def test_record_without_forecast_waits_while_in_flight_and_gives_up_when_complete() -> None:
    """An in-flight record without a forecast means "ask again" (None); a complete one means no forecast."""
    assert gw.forecast_from_record(pb.ResidueRecord(request_id="r"), 1.0) is None
    fc = gw.forecast_from_record(pb.ResidueRecord(request_id="r", complete=True), 1.0)
    assert fc is not None and fc.probability is None and fc.reason == gw.COMPLETE_NO_FORECAST


# ---------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("action", gw.ACTIONS)
def test_no_forecast_always_passes_through(action: gw.Action) -> None:
    """Without a probability nothing is guessed: every action and threshold passes the stream."""
    none = gw.Forecast(request_id="r", reason=gw.NOT_FOUND_REASON)
    for threshold in (None, 0.0):
        assert gw.decide(none, gw.Policy(threshold=threshold, action=action)) == "pass"


def test_decision_follows_the_flag_or_the_threshold() -> None:
    """threshold None uses the sidecar's flag; a number compares the probability (≥ acts); observe never
    acts."""
    flagged = gw.Forecast(request_id="r", probability=0.3, threshold=0.2, flagged=True)
    calm = gw.Forecast(request_id="r", probability=0.3, threshold=0.5, flagged=False)
    assert gw.decide(flagged, gw.Policy()) == "abort"
    assert gw.decide(calm, gw.Policy()) == "pass"
    assert gw.decide(calm, gw.Policy(threshold=0.3, action="reroute")) == "reroute"
    assert gw.decide(flagged, gw.Policy(threshold=0.31)) == "pass"
    assert gw.decide(flagged, gw.Policy(action="observe")) == "pass"


def test_policy_rejects_bad_fields_by_name() -> None:
    with pytest.raises(ValueError, match=r"Policy\.action"):
        gw.Policy(action="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Policy\.threshold"):
        gw.Policy(threshold=1.5)
    with pytest.raises(ValueError, match="poll_s"):
        gw.Policy(poll_s=0)


def test_reroute_without_a_fallback_is_refused() -> None:
    with pytest.raises(ValueError, match="fallback"):
        gw.ForecastGateway("http://x", object(), gw.Policy(action="reroute"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- chunks
def test_chunk_text_and_running_token_count() -> None:
    """Completion chunks carry ``text``, chat chunks ``delta.content`` (the role chunk adds nothing); the
    running token count comes from continuous usage stats."""
    assert gw.chunk_text({"choices": [{"text": "Par"}]}) == "Par"
    assert gw.chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert gw.chunk_text({"choices": [{"delta": {"content": "is"}}]}) == "is"
    assert gw.chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    assert gw.chunk_tokens_so_far({"usage": {"prompt_tokens": 5, "completion_tokens": 3}}) == 3
    assert gw.chunk_tokens_so_far({"choices": []}) is None


def test_openai_request_bodies() -> None:
    path, body = gw.openai_request("Hi", True, "m", 8, stream_options={"include_usage": True})
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "Hi"}]
    assert body["temperature"] == 0 and body["max_tokens"] == 8 and body["stream_options"]
    path, body = gw.openai_request("Hi", False, "m", 8)
    assert path == "/v1/completions" and body["prompt"] == "Hi"


# ---------------------------------------------------------------------------------------------- report
def test_threshold_at_fpr_is_the_empirical_roc_read_out() -> None:
    """At most ⌊fpr·n⌋ successes reach the threshold, and the share of failures that reach it equals
    ``detectors.evaluation.tpr_at_fpr`` on the same scores."""
    rng = np.random.default_rng(0)
    neg, pos = rng.random(300), rng.random(60) + 0.3
    scores, y = np.r_[neg, pos], np.r_[np.zeros(300), np.ones(60)]
    for fpr in (0.01, 0.05, 0.2):
        thr = gw.threshold_at_fpr(neg.tolist(), fpr)
        assert (neg >= thr).sum() <= math.floor(fpr * 300)
        assert (pos >= thr).mean() == pytest.approx(ev.tpr_at_fpr(scores, y, fpr))
    assert gw.threshold_at_fpr([], 0.05) == math.inf
    assert gw.threshold_at_fpr([0.2, 0.9], 0.01) == math.nextafter(0.9, math.inf)  # above every success


def test_report_counts_caught_failures_lost_answers_and_saved_tokens() -> None:
    """Flagged failures are caught, flagged successes are lost answers; tokens saved are the flagged
    requests' tokens generated after the forecast was readable; requests without a forecast pass."""
    runs = [
        _run(0, "wrong", 0.9, after=20, out=24),
        _run(1, "null", 0.8, after=None, out=0),  # forecast came after the (empty) output: saves 0
        _run(2, "wrong", 0.1, after=20, out=24),
        _run(3, "wrong", None, after=None, out=24),  # no forecast: never flagged
        _run(4, "right", 0.85, after=10, out=12),
        _run(5, "right", 0.2, after=10, out=12),
        _run(6, "right", 0.3, after=10, out=12),
    ]
    r = gw.evaluate_policy(runs, "t", 0.75)
    assert (r.n_items, r.n_failures, r.n_successes, r.n_no_forecast) == (7, 4, 3, 1)
    assert (r.failures_caught, r.failures_caught_share) == (2, 0.5)
    assert (r.answers_lost, r.answers_lost_share) == (1, pytest.approx(1 / 3))
    assert (r.output_tokens, r.tokens_saved, r.tokens_saved_on_failures) == (108, 30, 20)
    assert r.tokens_saved_share == pytest.approx(30 / 108)
    nothing = gw.evaluate_policy(runs, "inf", math.inf)
    assert nothing.threshold is None and nothing.failures_caught == nothing.tokens_saved == 0


def test_report_rows_at_1_and_5_pct_fpr_and_the_artifact_flags() -> None:
    """Rows fpr_1% and fpr_5% use thresholds read off the successes that have a forecast; the artifact
    row follows the sidecar's own flags."""
    runs = [_run(i, "right", i / 100, after=5) for i in range(100)]
    runs += [_run(100 + i, "wrong", 0.985 + i / 1000, after=7, flagged=i < 3) for i in range(10)]
    runs += [_run(200, "wrong", None)]
    one, five, art = gw.policy_report(runs)
    assert (one.name, five.name, art.name) == ("fpr_1%", "fpr_5%", "artifact")
    assert one.answers_lost == 1 and five.answers_lost == 5  # ⌊fpr·100⌋ successes reach the threshold
    assert one.failures_caught == five.failures_caught == 10 and one.n_no_forecast == 1
    assert five.tokens_saved == 10 * 7 + 5 * 5
    assert art.threshold is None and art.failures_caught == 3 and art.answers_lost == 0
    table = gw.format_table([one, five, art])
    assert "fpr_1%" in table and "artifact" in table

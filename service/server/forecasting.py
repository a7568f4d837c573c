"""The prefill failure forecast in the sidecar: score a request's PROMPT_LAST frame the moment it arrives.

``detectors.forecast`` fits the model (``residue eval``); this module applies it to ingest events. Pure:
no I/O and no clock (the pipeline stamps ``scored_time``). A request gets either a probability or the
reason it has none, never a made-up score:

* no forecast artifact is loaded (``RESIDUE_FORECAST`` unset);
* its PROMPT_LAST frame never arrived (not sampled, dropped by the plugin's bounded queue, lost in a
  reconnect) or arrived after the request was finalized (then it is dropped as late, and the record
  keeps the reason);
* the request was encoded with another transcoder than the one the forecast was fitted for, or the frame
  names layers the forecast does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from residue_monitor.detectors.exceptions import ArtifactMismatch
from residue_monitor.detectors.forecast import FLAG_NAME, PrefillForecast, load_forecast
from residue_monitor.service.server.events import AssembledRequest, Frame, Start
from residue_monitor.service.server.residue import row_of

NO_MODEL = "no prefill forecast model is loaded (set RESIDUE_FORECAST to an artifact from `residue eval`)"
NO_FRAME = (
    "no PROMPT_LAST frame arrived for this request (not sampled, dropped by the plugin's queue, or lost); "
    "a forecast needs the last prompt token's residue"
)
IN_FLIGHT = "in flight: the prefill forecast is in; the rest of the record follows when the request ends"
"""``incomplete_reason`` of the provisional record written when the forecast is made."""

__all__ = ["FLAG_NAME", "ForecastResult", "Forecaster", "forecast_request"]


@dataclass(frozen=True, slots=True)
class ForecastResult:
    """A request's forecast, or why there is none (``probability`` None and ``reason`` set)."""

    probability: float | None
    threshold: float = 1.0
    forecast_id: str = ""
    reason: str = ""
    prefill_time: float | None = None
    """Unix seconds the plugin captured the PROMPT_LAST row (the frame's ``captured_time``), if sent."""
    scored_time: float | None = None
    """Unix seconds the sidecar computed it (set by the pipeline)."""

    @property
    def flagged(self) -> bool:
        return self.probability is not None and self.probability >= self.threshold


class Forecaster:
    """A loaded ``PrefillForecast`` applied to frames."""

    def __init__(self, forecast: PrefillForecast) -> None:
        self.forecast = forecast
        self.id = forecast.id

    @classmethod
    def load(cls, path: Path, clt_id: str | None, n_layers: int | None) -> Forecaster:
        """Load an artifact; with a CLT loaded its id and layer count must match (``ArtifactMismatch``)."""
        return cls(load_forecast(path, clt_id=clt_id, n_layers=n_layers))

    def score_frame(self, frame: Frame, start: Start) -> ForecastResult:
        """The forecast of one PROMPT_LAST frame of the request ``start`` opened."""
        fc = self.forecast
        if start.clt_id and start.clt_id != fc.clt_id:
            return self._none(
                f"the forecast {self.id} was fitted for CLT {fc.clt_id!r}; this request was encoded with "
                f"{start.clt_id!r}"
            )
        if frame.layers.size and int(frame.layers[-1]) >= fc.n_layers:
            return self._none(
                f"the frame names layer {int(frame.layers[-1])}; forecast {self.id} has {fc.n_layers} layers"
            )
        try:
            p = fc.predict_row(row_of(frame, fc.n_layers))
        except ArtifactMismatch as e:  # pragma: no cover - guarded above; kept so a scorer never raises
            return self._none(str(e))
        return ForecastResult(p, fc.threshold, self.id, prefill_time=frame.captured_time)

    def _none(self, reason: str) -> ForecastResult:
        return ForecastResult(None, self.forecast.threshold, self.id, reason)


def prompt_frame(request: AssembledRequest) -> Frame | None:
    """The request's PROMPT_LAST frame (the first, if a plugin sent more than one)."""
    return next((f for f in request.frames if f.phase == "prompt_last"), None)


def forecast_request(request: AssembledRequest, forecaster: Forecaster | None) -> ForecastResult:
    """The forecast of a finished request (used when none was made live, e.g. no prompt frame came)."""
    if forecaster is None:
        return ForecastResult(None, reason=NO_MODEL)
    frame = prompt_frame(request)
    if frame is None:
        return ForecastResult(None, forecaster.forecast.threshold, forecaster.id, NO_FRAME)
    return forecaster.score_frame(frame, request.start)

"""What the assembler consumes and produces: validated ingest events and assembled requests.

These are plain frozen values (STYLE.md rule 2) built from the wire messages by ``validate.py``; the
assembler, the record builder and the scorers never see protobuf messages, so replay tests are lists of
these values. Arrays are numpy, read-only, and their shapes are written beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from residue_monitor.detectors.capture import Phase

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Start:
    """A request opened (RequestStart)."""

    request_id: str
    model: str = ""
    clt_id: str = ""
    tenant: str = ""
    start_time: float | None = None
    """Unix seconds; None when the plugin did not set it."""
    prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_token_ids: tuple[int, ...] = ()
    """Only when the deployment opted in (DESIGN.md §8)."""
    token_ids_opted_in: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One sampled position of a request (ResidueFrame), decoded and checked."""

    request_id: str
    position: int
    phase: Phase
    sequence: int
    layers: I32
    """(L,) layer ids, strictly increasing."""
    layer_stats: F64
    """(L, 6) per layer: error_ratio, l0, mass, in_norm, out_norm, unreached (column constants in
    ``detectors.signature``)."""
    feature_offsets: npt.NDArray[np.int64]
    """(L + 1,) layer i's features are ``feature_ids[offsets[i]:offsets[i + 1]]``."""
    feature_ids: I32
    """(N,) top-k feature ids of every layer, concatenated, strongest first within a layer."""
    feature_values: F32
    """(N,) their activations."""
    head_stats: F64
    """(H, 9) per head: layer, head, entropy, self, local, sink, span start, span len, span mass."""
    logits: tuple[float, float, float, float] | None = None
    """(entropy, top1_prob, margin, eos_prob), or None when the frame carried no LogitStats."""
    captured_time: float | None = None
    """Unix seconds the plugin captured the row; None when the frame did not say."""


@dataclass(frozen=True, slots=True)
class End:
    """A request finished (RequestEnd)."""

    request_id: str
    finish_reason: int = 0
    """``residue.v1.FinishReason`` value."""
    prompt_tokens: int = 0
    output_tokens: int = 0
    empty_output: bool = False
    end_time: float | None = None
    """Unix seconds; None when the plugin did not set it."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: lets the assembler expire idle requests and orphans with no other input."""


@dataclass(frozen=True, slots=True)
class Flush:
    """The sidecar is stopping: finalize every open request as incomplete."""


Event = Start | Frame | End | Tick | Flush


@dataclass(frozen=True, slots=True)
class AssembledRequest:
    """A finished (or abandoned) request: everything the record is computed from."""

    start: Start
    frames: tuple[Frame, ...]
    """Accepted frames, ordered by sequence (so arrival order never changes the record)."""
    end: End | None
    """None when the request never ended (expired, shut down)."""
    incomplete_reason: str = ""
    """Why there is no end ('' when complete)."""
    frames_over_limit: int = 0
    """Frames dropped because the request already had the maximum number."""
    duplicates: int = 0
    """Repeated frames dropped."""

    @property
    def complete(self) -> bool:
        return self.end is not None

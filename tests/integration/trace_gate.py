"""A stand-in for ``service.tracing.worker_run`` that holds a job until the test opens a gate.

The Trace tests patch ``service.server.trace.worker_run`` with :func:`gated_run` to keep a worker busy for
exactly as long as they need (busy refusals, ingest during a trace, a worker killed mid-job) instead of
hoping a graph takes long enough. It runs in the spawned worker process, so the gate is a file: a job whose
prompt text is ``GATE + path`` waits until ``path`` exists, then is traced normally.
"""

from __future__ import annotations

import time
from pathlib import Path

from residue_monitor.service.tracing import TraceJob, TraceOutcome, worker_run

GATE = "gate:"
MAX_WAIT_S = 120.0
"""A gate nobody opens releases its job after this, so a failed test cannot leave a worker stuck."""


def gated_run(job: TraceJob) -> TraceOutcome:
    if job.prompt.startswith(GATE):
        path = Path(job.prompt.removeprefix(GATE))
        end = time.monotonic() + MAX_WAIT_S
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.01)
    return worker_run(job)

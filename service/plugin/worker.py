"""The worker extension: RPC methods vLLM mixes into its worker (``--worker-extension-cls``).

``residue_install`` loads the CLT, builds the signature builder from the served model's own unembedding,
starts the sender and installs the capture hooks on the worker's model runner. The endpoint plugin calls
it through ``collective_rpc`` once the server is up (offline: ``llm.collective_rpc("residue_install")``).
State lives on the worker object (methods are re-resolved per RPC in multiprocess mode). Nothing here
raises into vLLM: a failure is logged and reported in the returned status.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXTENSION = "residue_monitor.service.plugin.worker.ResidueWorkerExtension"
"""The value of vLLM's ``--worker-extension-cls``."""


class ResidueWorkerExtension:
    """Mixed into vLLM's worker class; every name starts with ``residue_`` (vLLM refuses clashes)."""

    residue_state: Any = None

    def residue_install(self) -> dict[str, Any]:
        """Start capture on this worker (idempotent). Returns the status dict of ``residue_stats``."""
        if self.residue_state is not None:
            return self.residue_stats()
        try:
            self.residue_state = _install(self)
        except Exception as e:  # never break the server: report and stay off
            logger.error("residue capture not installed: %s: %s", type(e).__name__, e)
            self.residue_state = _Off(f"{type(e).__name__}: {e}")
        return self.residue_stats()

    def residue_stats(self) -> dict[str, Any]:
        """Capture and sender counters of this worker, or why capture is off."""
        st = self.residue_state
        if st is None:
            return {"active": False, "reason": "not installed (residue_install was never called)"}
        if isinstance(st, _Off):
            return {"active": False, "reason": st.reason}
        cap, snd = st
        return {
            "active": cap.enabled,
            "capture": asdict(cap.stats),
            "sender": asdict(snd.stats),
            "clt_id": snd.builder.clt_id,
            "model": snd.builder.model,
            "target": snd.target,
        }

    def residue_flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every captured event was handed to the sidecar stream (tests, graceful stop)."""
        st = self.residue_state
        if st is None or isinstance(st, _Off):
            return True
        st[0].sweep()
        return st[1].flush(timeout_s)

    def residue_set_enabled(self, enabled: bool) -> dict[str, Any]:
        """Pause or resume capture at run time (the hooks stay installed but return at once)."""
        st = self.residue_state
        if st is not None and not isinstance(st, _Off):
            st[0].enabled = bool(enabled)
        return self.residue_stats()


class _Off:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _install(worker: Any) -> tuple[Any, Any] | _Off:
    from residue_monitor.service.plugin.config import PluginConfig

    cfg = PluginConfig.from_env()
    if not cfg.active:
        why = "RESIDUE_DISABLE is set" if cfg.disabled else "RESIDUE_ENABLED is not set"
        return _Off(why)
    if getattr(worker, "rank", 0) != 0:
        return _Off("only the first worker (rank 0) captures")
    if not cfg.clt_path:
        return _Off("RESIDUE_CLT is not set: the plugin needs the transcoder folder")

    import torch

    from residue_monitor.detectors.clt.io import load_clt
    from residue_monitor.detectors.signature import SignatureBuilder
    from residue_monitor.service.plugin.capture import LiveCapture
    from residue_monitor.service.plugin.sender import FrameSender

    runner = worker.model_runner
    model = runner.model
    n_layers = len(model.model.layers)
    hf = runner.model_config.hf_config
    clt = load_clt(cfg.clt_path, expected_d_model=int(hf.hidden_size), expected_n_layers=n_layers)
    device = next(model.parameters()).device
    clt = clt.to(device)
    # The readout as the residual stream sees it: unembedding ⊙ final RMSNorm scale (SignatureBuilder).
    with torch.no_grad():
        w = model.lm_head.weight.detach().float()
        readout = w * model.model.norm.weight.detach().float()[None, :]
    eos = getattr(hf, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    served = runner.model_config.served_model_name
    served = served[0] if isinstance(served, list) else served
    name = cfg.model_name or Path(str(served)).name
    builder = SignatureBuilder(clt, readout, k=cfg.top_k, eos_id=eos, model=name, with_heads=cfg.heads)
    tls_ca = Path(cfg.tls_ca).read_bytes() if cfg.tls_ca else None
    a0 = model.model.layers[0].self_attn.attn
    scale = float(getattr(a0, "scale", None) or a0.impl.scale)
    sender = FrameSender(builder, cfg.target, token=cfg.token, tls_ca=tls_ca, tenant=cfg.tenant,
                         queue_size=cfg.queue_size, attn_scale=scale)  # fmt: skip
    cap = LiveCapture(
        runner,
        sender.offer,
        decode_every=cfg.decode_every,
        sample_prompt_last=cfg.sample_prompt_last,
        sample_final=cfg.sample_final,
        request_fraction=cfg.request_fraction,
        heads=cfg.heads,
        send_token_ids=cfg.send_token_ids,
    )
    sender.on_idle = cap.sweep
    sender.capture_counters = lambda: (
        sum(cap.stats.hook_errors.values()),
        cap.stats.capture_seconds,
        cap.stats.steps,
    )
    sender.start()
    cap.install()
    logger.info(
        "residue capture installed: model %s, CLT %s, %d layers, sidecar %s, every %d decode rows",
        name,
        builder.clt_id,
        n_layers,
        cfg.target,
        cfg.decode_every,
    )
    return cap, sender

"""The sidecar process: grpc.aio server + health + reflection + pipeline + store + /metrics, and its drain.

Graceful stop (SIGTERM, or ``Sidecar.stop``), in order:

1. health reports NOT_SERVING for every service, so load balancers and probes stop sending calls here;
2. after ``drain_delay_s``: WatchFlags streams end cleanly, Ingest streams return their summary after the
   message in hand, and the server stops accepting calls;
3. in-flight calls get ``grace_s`` to finish, then are cancelled;
4. the trace workers stop (a graph still being built is abandoned), requests still open are stored as
   incomplete, pending store writes finish, the store closes (a RedisStore makes a last attempt to flush
   its backlog), /metrics stops.

With ``RESIDUE_TRACE_MODEL`` set, the trace workers start loading the model in the background at start, so
the first Trace call does not pay for it and a model that cannot load is logged at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import replace
from pathlib import Path

from grpc import aio, ssl_server_credentials
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from residue_monitor.detectors.clt.io import load_clt
from residue_monitor.detectors.clt.model import CrossLayerTranscoder
from residue_monitor.detectors.exceptions import ArtifactMismatch
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service._proto import residue_pb2_grpc as pb_grpc
from residue_monitor.service.exporter import (
    MetricsServer,
    StatsAccumulator,
    register_collectors,
    start_metrics_server,
)
from residue_monitor.service.server.assembler import AssemblerLimits
from residue_monitor.service.server.auth import BearerTokenInterceptor, TenantTokens
from residue_monitor.service.server.config import ServerConfig
from residue_monitor.service.server.errors import ErrorInterceptor
from residue_monitor.service.server.flags import FlagHub
from residue_monitor.service.server.forecasting import Forecaster
from residue_monitor.service.server.pipeline import IngestPipeline
from residue_monitor.service.server.scoring import Registry, Scorer, default_scorers
from residue_monitor.service.server.servicer import ResidueServicer
from residue_monitor.service.server.trace import TraceService
from residue_monitor.service.server.validate import FrameLimits
from residue_monitor.service.store import Store, StoreConfig
from residue_monitor.service.store.factory import store_from_config

logger = logging.getLogger(__name__)

MIN_PING_INTERVAL_MS = 10_000
"""Shortest interval between client keepalive pings the sidecar accepts (the plugin pings every 30 s)."""


def freeze_heap() -> int:
    """Collect once, then move every object alive now (modules, torch, the CLT, scorers: ~280,000 objects)
    into the collector's permanent generation; returns how many. Python's full collections otherwise walk
    all of them again and again: measured in benchmarks/ingest.py, each stopped the event loop 100-140 ms,
    every second or two under ingest load (every call in flight waited). After the freeze they take ~2 ms,
    and ingest gained 10-17 %. Objects made later are collected as before; frozen ones are never freed,
    which is what long-lived ones are for."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ResidueService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Sidecar:
    """One running sidecar. ``await start()``, then ``await stop()`` (or ``serve()`` for the CLI)."""

    def __init__(
        self,
        cfg: ServerConfig,
        *,
        store: Store | None = None,
        scorers: Registry[Scorer] | None = None,
        clt: CrossLayerTranscoder | None = None,
        registry: CollectorRegistry | None = None,
        forecaster: Forecaster | None = None,
    ) -> None:
        """``store`` / ``clt`` / ``forecaster`` override what ``cfg`` names (tests inject them; an injected
        store is not closed by ``stop``); ``registry`` receives the metrics (a fresh one by default)."""
        self.forecaster = forecaster
        self.cfg = cfg
        self._store = store
        self._owns_store = store is None
        self._clt = clt
        self.scorers = scorers if scorers is not None else default_scorers(cfg)
        self.stats = StatsAccumulator(self.scorers.names())
        self.registry = registry if registry is not None else CollectorRegistry()
        self.hub = FlagHub()
        self._draining = asyncio.Event()
        self._server: aio.Server | None = None
        self._health_server: aio.Server | None = None
        self.health_port: int | None = None
        """The bound plaintext health-only port (after ``start``), None when ``RESIDUE_HEALTH_PORT`` is -1."""
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # stubs lack grpc's aio
        self._ticker: asyncio.Task[None] | None = None
        self._metrics: MetricsServer | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self.pipeline: IngestPipeline | None = None
        self.tracer: TraceService | None = None
        """The Trace RPC's worker pool (after ``start``)."""
        self.port = 0
        """The bound gRPC port (after ``start``)."""

    @property
    def store(self) -> Store:
        assert self._store is not None, "start() first"
        return self._store

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port, or None when the endpoint is off."""
        return None if self._metrics is None else self._metrics.port

    def _check_fingerprints(self) -> None:
        """Fingerprints fitted with another transcoder would score meaningless inputs: refuse to start."""
        if self._clt is None:
            return
        clt_id = self._clt.clt_id()
        for s in self.scorers:
            if s.info.clt_id and s.info.clt_id != clt_id:
                raise ArtifactMismatch(
                    f"fingerprint {s.info.name} was fitted with CLT {s.info.clt_id}, but the sidecar loaded "
                    f"CLT {clt_id} ({self.cfg.clt_path or 'injected'}): refit it (residue shells run) or "
                    "load the transcoder it was fitted with"
                )

    async def start(self) -> None:
        """Load the CLT, open the store, bind the port, report SERVING."""
        cfg = self.cfg
        if self._clt is None and cfg.clt_path:
            self._clt = await asyncio.to_thread(load_clt, Path(cfg.clt_path))
        if self._store is None:
            store_cfg = StoreConfig.from_env()
            self._store = store_from_config(
                replace(store_cfg, redis_url=cfg.redis_url or store_cfg.redis_url)
            )
        self._check_fingerprints()
        clt = self._clt
        if cfg.forecast_path and self.forecaster is None:
            self.forecaster = Forecaster.load(
                Path(cfg.forecast_path),
                clt.clt_id() if clt is not None else None,
                clt.n_layers if clt is not None else None,
            )
        fc = self.forecaster
        if fc is not None and clt is not None and fc.forecast.clt_id != clt.clt_id():
            raise ArtifactMismatch(
                f"prefill forecast {fc.id} was fitted for CLT {fc.forecast.clt_id}, the sidecar loaded CLT "
                f"{clt.clt_id()}: refit it (residue eval) or load the transcoder it was fitted with"
            )
        limits = FrameLimits.from_config(cfg, self._clt)
        self.pipeline = IngestPipeline(
            self._store,
            self.scorers,
            self.stats,
            self.hub,
            limits,
            AssemblerLimits.from_config(cfg),
            forecaster=self.forecaster,
        )
        interceptors: list[aio.ServerInterceptor] = [ErrorInterceptor()]  # outermost: sees every error
        tenants = TenantTokens.load(cfg.tenant_tokens_path, cfg.token) if cfg.tenant_tokens_path else None
        if cfg.token:
            interceptors.append(BearerTokenInterceptor(cfg.token, tenants))
        server = aio.server(
            interceptors=interceptors,
            options=[
                # The plugin pings its idle Ingest stream every 30 s (service/plugin/sender.py). gRPC servers
                # accept one ping per 5 minutes without data by default and answer more with GOAWAY
                # "too_many_pings": seen in benchmarks/faults.py, the plugin's stream broke and reconnected.
                ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                # Sends are the sidecar's own answers: only Trace's graph JSON outgrows the receive limit.
                ("grpc.max_send_message_length", max(cfg.max_message_bytes, cfg.trace_max_response_bytes)),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        self.tracer = TraceService(cfg, self._store, self.stats)
        servicer = ResidueServicer(
            self.pipeline, self._store, self.scorers, self.hub, self._draining, self.tracer, tenants
        )
        pb_grpc.add_ResidueServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls:
            key, chain = cfg.read_tls()
            self.port = server.add_secure_port(address, ssl_server_credentials([(key, chain)]))
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        self.tracer.warm_up()
        if cfg.health_port >= 0:
            # Probes carry no token and speak no TLS: this port serves the health service alone.
            hs = aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, hs)
            self.health_port = hs.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
            await hs.start()
            self._health_server = hs
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        tick_s = min(1.0, cfg.orphan_grace_s / 4, cfg.request_expiry_s / 4)
        self._ticker = asyncio.get_running_loop().create_task(self.pipeline.run_ticker(tick_s))
        if cfg.metrics_port >= 0:
            register_collectors(self.registry, self.stats.snapshot)
            self._metrics = start_metrics_server(self.registry, cfg.metrics_host, cfg.metrics_port)
        frozen = freeze_heap()
        logger.info(
            "residue sidecar on %s:%d (%s%s), CLT %s, scorers %s, prefill forecast %s, Trace %s; "
            "%d startup objects frozen",
            cfg.host, self.port, "TLS" if cfg.tls else "plaintext", ", token auth" if cfg.token else "",
            self._clt.clt_id() if self._clt is not None else "none", ", ".join(self.scorers.names()),
            self.forecaster.id if self.forecaster is not None else "off", cfg.trace_model or "off", frozen,
        )  # fmt: skip

    async def stop(self, grace_s: float | None = None, drain_delay_s: float | None = None) -> None:
        """Drain and stop (module docstring); concurrent calls wait for the same drain."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._drain(grace_s, drain_delay_s))
        await asyncio.shield(self._stop_task)

    async def _drain(self, grace_s: float | None, drain_delay_s: float | None) -> None:
        cfg = self.cfg
        await self._health.enter_graceful_shutdown()
        await asyncio.sleep(cfg.drain_delay_s if drain_delay_s is None else drain_delay_s)
        self._draining.set()
        self.hub.close()
        if self._server is not None:
            await self._server.stop(cfg.grace_s if grace_s is None else grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.tracer is not None:
            await self.tracer.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.pipeline is not None:
            await self.pipeline.flush()
        if self._store is not None and self._owns_store:
            await self._store.close()
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        logger.info("residue sidecar stopped")

    async def wait(self) -> None:
        """Until the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(cfg: ServerConfig, *, clt: CrossLayerTranscoder | None = None) -> None:
    """Run a sidecar until SIGINT or SIGTERM, then drain it (the ``residue serve`` command)."""
    sidecar = Sidecar(cfg, clt=clt)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("signal received: draining (grace %.1f s)", cfg.grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await sidecar.stop()

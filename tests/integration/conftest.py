"""Integration fixtures: private redis-server processes (never a shared or system Redis), and stores of
either backend (``store`` / ``make_store``, parametrized over memory and redis) for contract tests.

Each server listens on 127.0.0.1 on a free port, requires a password (so every Redis test also covers
authenticated URLs), keeps nothing on disk (``--save "" --appendonly no``) and runs in a temp folder.
Tests needing Redis are skipped, with the reason, only when no ``redis-server`` binary is on PATH.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from residue_monitor.detectors.clt.model import CLTConfig, CrossLayerTranscoder, random_clt
from residue_monitor.service.engine import Engine, load_engine
from residue_monitor.service.models import PreparedModel
from residue_monitor.service.store import MemoryStore, RedisStore, Store
from tests.integration.residue_data import save_tiny_transcoder

REDIS_PASSWORD = "residue-test-pw"
MakeStore = Callable[..., Store]
"""``make_store(**kwargs)``: a new store of the parametrized backend, closed after the test."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One private ``redis-server`` process that a test may stop (kill -9) and start again on its port."""

    def __init__(self, binary: str, workdir: Path, appendonly: bool = False) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.appendonly = appendonly
        """Persist with an append-only file, fsync'd on every write (deploy/ uses AOF too): a killed server
        restarted on the same folder keeps everything it acknowledged."""

    @property
    def url(self) -> str:
        """``redis://:password@127.0.0.1:port/0``."""
        return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start on ``self.port`` and wait until it answers PING."""
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--requirepass", REDIS_PASSWORD, "--dir", str(self.workdir)],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=self.port, password=REDIS_PASSWORD, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except RedisConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Kill the server (SIGKILL: an abrupt crash, nothing flushed) and reap it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self) -> redis.Redis:
        """A synchronous client, for looking at keys directly (close it after use)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=REDIS_PASSWORD)

    def flushall(self) -> None:
        """Empty every database (between tests sharing the server)."""
        with self.client() as client:
            client.flushall()


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary on PATH: install redis-server to run the Redis store tests")
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server shared by the session's tests; do not stop it (use ``fresh_redis_server``)."""
    server = RedisServer(_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test, which may kill and restart it."""
    server = RedisServer(_binary(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    """'memory' or 'redis' (the latter marked ``redis``): which Store implementation a test gets."""
    return request.param


@pytest_asyncio.fixture
async def make_store(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Factory for stores of the parametrized backend (an empty private Redis for 'redis')."""
    created: list[Store] = []
    server: RedisServer | None = None
    if backend == "redis":
        shared: RedisServer = request.getfixturevalue("redis_server")
        shared.flushall()
        server = shared

    def make(**kw: Any) -> Store:
        if server is None:
            store: Store = MemoryStore(**kw)
        else:
            kw.pop("max_records", None)
            store = RedisStore.from_url(server.url, **kw)
        created.append(store)
        return store

    yield make
    for s in created:
        await s.close()


@pytest_asyncio.fixture
async def store(make_store: MakeStore) -> Store:
    """A store of the parametrized backend with default settings."""
    return make_store()


@pytest.fixture(scope="session")
def clt() -> CrossLayerTranscoder:
    """A random transcoder matching the tiny model (4 layers, d_model 64): the one the server, scale-out
    and dashboard tests check real tiny-model frames against."""
    return random_clt(CLTConfig(n_layers=4, d_model=64, n_features=256, k=16), seed=1, scale=0.5)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(key, certificate) PEM files for CN/SAN localhost and 127.0.0.1, valid one day (openssl CLI)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True, check=False,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a test certificate: {made.stderr.decode()[:200]}")
    return key, cert


@pytest.fixture(scope="module")
def engine(
    tiny_home: Path, tiny_model: PreparedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """The tiny model + the random TopK transcoder saved to disk, loaded as the CLI loads them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESIDUE_HOME", str(tiny_home))
        mp.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("mplconfig")))
        clt_dir, _ = save_tiny_transcoder(tmp_path_factory.mktemp("clt") / "tiny-topk")
        yield load_engine("tiny", clt_dir)

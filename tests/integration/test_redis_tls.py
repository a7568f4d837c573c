"""Redis over TLS with AUTH (issue 10): the store reached through ``REDIS_URL=rediss://:password@…`` with
a CA file, as an operator would configure it, against a private ``redis-server`` serving TLS only."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from residue_monitor.detectors.exceptions import StoreUnavailable
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.store.factory import store_from_env
from tests.integration.conftest import _free_port, self_signed

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]
PASSWORD = "tls-s3cret"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """(port, CA file) of a redis-server that speaks only TLS and needs AUTH."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary on PATH")
    folder = tmp_path_factory.mktemp("redis-tls")
    key, cert = self_signed(folder)
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis(host="localhost", port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(cert))
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if proc.poll() is not None:
                pytest.skip("this redis-server cannot serve TLS (built without it?)")
            assert time.monotonic() < deadline, "TLS redis-server did not start"
            time.sleep(0.05)
    client.close()
    try:
        yield port, cert
    finally:
        proc.kill()
        proc.wait(10)


def record(rid: str) -> pb.ResidueRecord:
    r = pb.ResidueRecord(request_id=rid, model="m", clt_id="clt-1", complete=True)
    r.start_time.FromSeconds(int(time.time()))
    return r


async def test_rediss_with_auth_stores_and_reads(tls_redis: tuple[int, Path]) -> None:
    """rediss:// with the password and the CA in REDIS_URL: a record is written and read back over TLS."""
    port, ca = tls_redis
    store = store_from_env({"REDIS_URL": f"rediss://:{PASSWORD}@localhost:{port}/0?ssl_ca_certs={ca}"})
    try:
        await store.put_record(record("tls-1"))
        got = await store.get_record("tls-1", "")
        assert got.request_id == "tls-1" and got.complete
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "rediss://:wrong@localhost:{port}/0?ssl_ca_certs={ca}",  # bad password
        "rediss://:" + PASSWORD + "@localhost:{port}/0",  # server certificate not trusted
        "redis://:" + PASSWORD + "@localhost:{port}/0",  # plaintext to a TLS-only port
    ],
    ids=["wrong-password", "untrusted-certificate", "plaintext"],
)
async def test_misconfigured_tls_or_auth_is_store_unavailable(tls_redis: tuple[int, Path], url: str) -> None:
    """A wrong password, an untrusted server certificate or plaintext to the TLS port never reads data: the
    read is StoreUnavailable (UNAVAILABLE over gRPC), and the message does not echo the password."""
    port, ca = tls_redis
    store = store_from_env({"REDIS_URL": url.format(port=port, ca=ca)})
    try:
        with pytest.raises(StoreUnavailable) as ei:
            await store.get_record("tls-1", "")
        assert PASSWORD not in str(ei.value) and "wrong" not in str(ei.value)
    finally:
        await store.close()

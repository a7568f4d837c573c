"""``ServerConfig``: defaults, environment parsing, overrides, and errors that name the variable."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service.server.config import ENV, ServerConfig


def test_every_field_has_a_default_and_a_variable() -> None:
    """STYLE.md rule 7: each setting has a default and exactly one environment variable."""
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    assert names == set(ENV)
    assert ServerConfig() == ServerConfig.from_env({})


def test_from_env_parses_types_and_overrides_win() -> None:
    """Numbers are parsed by the field's type; empty values keep the default; overrides (CLI) win."""
    env = {
        "RESIDUE_PORT": "6000",
        "RESIDUE_REQUEST_EXPIRY_S": "2.5",
        "RESIDUE_TOKEN": "",
        "REDIS_URL": "redis://x",
    }
    cfg = ServerConfig.from_env(env, port=7000, metrics_port=None)
    assert (cfg.port, cfg.request_expiry_s, cfg.token, cfg.redis_url) == (7000, 2.5, "", "redis://x")
    assert cfg.metrics_port == 9464


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RESIDUE_PORT": "http"}, "RESIDUE_PORT='http' is not an integer"),
        ({"RESIDUE_PORT": "70000"}, "RESIDUE_PORT must be a port"),
        ({"RESIDUE_MAX_OPEN_REQUESTS": "0"}, "RESIDUE_MAX_OPEN_REQUESTS must be an integer >= 1"),
        ({"RESIDUE_REQUEST_EXPIRY_S": "-1"}, "RESIDUE_REQUEST_EXPIRY_S must be a positive number"),
        ({"RESIDUE_TLS_CERT": "cert.pem"}, "RESIDUE_TLS_KEY"),
        ({"RESIDUE_TOKEN": "two words"}, "RESIDUE_TOKEN must not contain whitespace"),
        ({"RESIDUE_MAX_MESSAGE_BYTES": "100"}, "RESIDUE_MAX_MESSAGE_BYTES must be at least"),
        ({"RESIDUE_TRACE_MODEL": "/nonexistent/model"}, "RESIDUE_TRACE_MODEL must be one of smollm2, tiny"),
        ({"RESIDUE_TRACE_MAX_TOKENS": "0"}, "RESIDUE_TRACE_MAX_TOKENS must be an integer >= 1"),
        ({"RESIDUE_TRACE_MAX_BYTES": "-5"}, "RESIDUE_TRACE_MAX_BYTES must be an integer >= 1"),
        ({"RESIDUE_TRACE_TIMEOUT_S": "0"}, "RESIDUE_TRACE_TIMEOUT_S must be a positive number"),
        ({"RESIDUE_TRACE_MAX_FEATURE_NODES": "0"}, "RESIDUE_TRACE_MAX_FEATURE_NODES must be an integer >= 1"),
        ({"RESIDUE_TRACE_WORKERS": "0"}, "RESIDUE_TRACE_WORKERS must be an integer >= 1"),
        ({"RESIDUE_TRACE_QUEUE": "-1"}, "RESIDUE_TRACE_QUEUE must be an integer >= 0"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ServerConfig.from_env(env)


def test_unknown_override_and_unreadable_tls_files() -> None:
    with pytest.raises(InvalidInput, match="unknown setting"):
        ServerConfig.from_env({}, prot=1)
    cfg = ServerConfig(tls_cert="/nonexistent/cert.pem", tls_key="/nonexistent/key.pem")
    with pytest.raises(InvalidInput, match=r"RESIDUE_TLS_KEY=.* cannot be read"):
        cfg.read_tls()


def test_trace_settings(tmp_path: Path) -> None:
    """Trace is off by default; on with a named model or an HF folder (a folder with config.json), with
    the documented defaults for its limits."""
    cfg = ServerConfig()
    assert not cfg.trace_enabled
    assert (cfg.trace_max_tokens, cfg.trace_max_bytes, cfg.trace_timeout_s) == (256, 4 << 30, 120.0)
    assert (cfg.trace_max_feature_nodes, cfg.trace_workers, cfg.trace_queue) == (1024, 1, 2)
    assert ServerConfig.from_env({"RESIDUE_TRACE_MODEL": "smollm2"}).trace_enabled
    assert ServerConfig.from_env({"RESIDUE_TRACE_MODEL": "tiny"}).trace_enabled
    (tmp_path / "config.json").write_text("{}")
    assert ServerConfig.from_env({"RESIDUE_TRACE_MODEL": str(tmp_path)}).trace_model == str(tmp_path)


def test_tenant_tokens_file_is_checked(tmp_path: Path) -> None:
    """A tenant-token file with a bad tenant name, a reused token, RESIDUE_TOKEN itself or bad JSON is
    refused at start (InvalidInput naming the file and entry); so is a tenant-token file without a
    RESIDUE_TOKEN."""
    from residue_monitor.service.server.auth import TenantTokens

    p = tmp_path / "t.json"
    for doc, why in (
        ({"tokens": [{"token": "a", "tenants": ["bad}name"]}]}, "invalid"),
        ({"tokens": [{"token": "a", "tenants": ["x"]}, {"token": "a", "tenants": ["y"]}]}, "unique"),
        ({"tokens": [{"token": "main", "tenants": ["x"]}]}, "unique"),
        ({"tokens": [{"token": "a b", "tenants": ["x"]}]}, "whitespace"),
        ({"tokens": [{"token": "a", "tenants": []}]}, "non-empty list"),
    ):
        p.write_text(json.dumps(doc))
        with pytest.raises(InvalidInput, match=why):
            TenantTokens.load(p, "main")
    p.write_text("{not json")
    with pytest.raises(InvalidInput, match="RESIDUE_TENANT_TOKENS"):
        TenantTokens.load(p, "main")
    with pytest.raises(InvalidInput, match="needs RESIDUE_TOKEN"):
        ServerConfig(tenant_tokens_path=str(p))

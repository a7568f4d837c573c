"""The plugin's pure parts, without vLLM: settings, request ids, request sampling, the hook guard, the
bounded queue and the drop report. (The plugin inside a real vLLM server: tests/integration/test_vllm_*.)"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.service._proto import residue_pb2 as pb
from residue_monitor.service.plugin import register
from residue_monitor.service.plugin import sender as sender_mod
from residue_monitor.service.plugin.capture import (
    EndEvent,
    LiveCapture,
    RowEvent,
    StartEvent,
    external_request_id,
    sampled_request,
)
from residue_monitor.service.plugin.config import PluginConfig
from residue_monitor.service.plugin.launch import vllm_command
from residue_monitor.service.plugin.sender import FrameSender


def test_settings_from_env_and_errors_name_the_variable() -> None:
    """Defaults are DESIGN.md §4's; booleans and numbers parse; a bad value names its variable; the kill
    switch wins over RESIDUE_ENABLED."""
    d = PluginConfig.from_env({})
    assert (d.active, d.decode_every, d.top_k, d.request_fraction, d.queue_size) == (False, 16, 32, 1.0, 1024)
    env = {"RESIDUE_ENABLED": "yes", "RESIDUE_SAMPLE_DECODE_EVERY": "4", "RESIDUE_SAMPLE_FINAL": "off",
           "RESIDUE_SAMPLE_REQUEST_FRACTION": "0.25"}  # fmt: skip
    c = PluginConfig.from_env(env)
    assert (c.active, c.decode_every, c.sample_final, c.request_fraction) == (True, 4, False, 0.25)
    assert not PluginConfig.from_env({"RESIDUE_ENABLED": "1", "RESIDUE_DISABLE": "1"}).active
    for env, var in (({"RESIDUE_SAMPLE_DECODE_EVERY": "0"}, "RESIDUE_SAMPLE_DECODE_EVERY"),
                     ({"RESIDUE_ENABLED": "maybe"}, "RESIDUE_ENABLED"),
                     ({"RESIDUE_SAMPLE_REQUEST_FRACTION": "1.5"}, "RESIDUE_SAMPLE_REQUEST_FRACTION"),
                     ({"RESIDUE_SIDECAR_TARGET": "nowhere"}, "RESIDUE_SIDECAR_TARGET"),
                     ({"RESIDUE_TOP_K": "many"}, "RESIDUE_TOP_K")):  # fmt: skip
        with pytest.raises(InvalidInput, match=var):
            PluginConfig.from_env(env)


def test_register_is_idempotent_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM calls register() in every process, possibly more than once; bad settings only log."""
    monkeypatch.setenv("RESIDUE_SAMPLE_DECODE_EVERY", "zero")
    register()
    register()


def test_request_ids_match_what_the_openai_api_returned() -> None:
    assert external_request_id("cmpl-8e77313a65bafcff-0-1a2b3c4d") == "cmpl-8e77313a65bafcff"
    assert external_request_id("cmpl-8e77313a65bafcff-2-1a2b3c4d") == "cmpl-8e77313a65bafcff-2"
    assert external_request_id("chatcmpl-989b685c8b91f1c3-deadbeef") == "chatcmpl-989b685c8b91f1c3"
    assert external_request_id("my-own-id") == "my-own-id"  # no engine suffix: unchanged


def test_request_fraction_is_stable_and_proportional() -> None:
    ids = [f"cmpl-{i:08x}" for i in range(20_000)]
    picked = [i for i in ids if sampled_request(i, 0.25)]
    assert abs(len(picked) / len(ids) - 0.25) < 0.02
    assert picked == [i for i in ids if sampled_request(i, 0.25)]  # same decision every time, everywhere
    assert all(sampled_request(i, 1.0) for i in ids[:100]) and not any(
        sampled_request(i, 0.0) for i in ids[:100]
    )


def _fake_runner() -> Any:
    """The runner attributes LiveCapture reads: a Llama-shaped module tree, a sampler, the config."""
    attn = SimpleNamespace(num_heads=4, num_kv_heads=2, head_size=8, scale=8**-0.5)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.__dict__.update(vars(attn))

    layer = nn.Module()
    layer.mlp = nn.Linear(4, 4)  # pyright: ignore[reportAttributeAccessIssue]
    layer.self_attn = nn.Module()  # pyright: ignore[reportAttributeAccessIssue]
    layer.self_attn.attn = Attn()  # pyright: ignore[reportAttributeAccessIssue]
    model = nn.Module()
    model.model = nn.Module()  # pyright: ignore[reportAttributeAccessIssue]
    model.model.layers = nn.ModuleList([layer])  # pyright: ignore[reportAttributeAccessIssue]
    return SimpleNamespace(model=model, sampler=nn.Identity(), model_config=SimpleNamespace(max_model_len=64),
                           requests={}, input_batch=SimpleNamespace(req_ids=[], num_reqs=0))  # fmt: skip


def test_a_raising_hook_is_counted_and_never_reaches_the_caller() -> None:
    """A hook that raises drops the step's capture, is counted by kind, and returns normally."""
    cap = LiveCapture(_fake_runner(), lambda _e: True)

    def boom(*_a: Any) -> None:
        raise RuntimeError("kaboom")

    hook = cap._guard("mlp", boom)  # pyright: ignore[reportPrivateUsage]
    hook(None, (torch.zeros(1),))
    hook(None, (torch.zeros(1),))
    assert cap.stats.hook_errors == {"mlp": 2}
    cap.install()
    cap.model.model.layers[0].mlp(torch.zeros(2, 4))  # pyright: ignore  # hooks installed, no plan: a no-op
    cap.uninstall()


def test_unsampled_requests_and_vanished_requests() -> None:
    """Requests leaving the runner without a stop the worker saw are closed (reason 'vanished')."""
    events: list[Any] = []
    cap = LiveCapture(_fake_runner(), lambda e: events.append(e) or True)
    st = SimpleNamespace(num_prompt_tokens=5, prompt_token_ids=[1, 2, 3, 4, 5])
    cap._start("cmpl-abc-0-12345678", st, 0)  # pyright: ignore[reportPrivateUsage]
    cap.sweep()  # not in input_batch, not in runner.requests: gone
    assert [type(e).__name__ for e in events] == ["StartEvent", "EndEvent"]
    end = events[1]
    assert isinstance(end, EndEvent) and end.request_id == "cmpl-abc" and end.reason == "vanished"


def test_full_queue_drops_and_counts_and_reports() -> None:
    """offer() never waits: past the bound it returns False and counts; the drop report carries it."""
    builder: Any = SimpleNamespace(model="m", clt_id="c")
    s = FrameSender(builder, "127.0.0.1:1", queue_size=2)
    ev = EndEvent("r", "stop", 1, 1, False, 0.0)
    assert [s.offer(ev) for _ in range(4)] == [True, True, False, False]
    s.capture_counters = lambda: (3, 0.5, 100)
    ps = s.plugin_stats().plugin_stats
    assert (ps.queue_full, ps.hook_errors, ps.capture_seconds, ps.captured_steps) == (2, 3, 0.5, 100)
    assert ps.instance_id == s.instance_id and len(ps.instance_id) == 32


def _row(phase: str, rid: str = "r") -> RowEvent:
    z = torch.zeros(1, 1)
    return RowEvent(rid, 5, phase, z, z, None, None, torch.zeros(3), 0, 1.0)  # type: ignore[arg-type]


def test_starts_and_last_prompt_rows_skip_the_batch_and_keep_request_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows are batched for up to BATCH_WAIT_S (here 60 s), but a request start and a last-prompt row go
    through the urgent encoder at once (the sidecar's prefill forecast needs them before the answer is
    generated), and a request's end is never encoded before its urgent events."""
    monkeypatch.setattr(sender_mod, "BATCH_WAIT_S", 60.0)
    builder: Any = SimpleNamespace(model="m", clt_id="c")
    s = FrameSender(builder, "127.0.0.1:1", queue_size=16)

    def encode(evs: list[Any]) -> list[pb.IngestMessage]:  # no transcoder here: one message per event
        return [pb.IngestMessage(end=pb.RequestEnd(request_id=f"{e.request_id}:{type(e).__name__}:"
                                                   f"{getattr(e, 'phase', '')}")) for e in evs]  # fmt: skip

    s._messages = encode  # type: ignore[method-assign]
    for t in s._encoders:  # the encoders only: no gRPC stream in a unit test
        t.start()
    try:
        assert s.offer(_row("decode", "a"))  # waits in the batch encoder for 60 s
        assert s.offer(StartEvent("b", 3, 0, 0.0))
        assert s.offer(_row("prompt_last", "b"))
        deadline = time.monotonic() + 20
        while len(s._pending) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        sent = [m.end.request_id for m in s._pending]
        assert sent == ["b:StartEvent:", "b:RowEvent:prompt_last"], sent  # "a" still batching
    finally:
        s._stop.set()


def test_vllm_command_with_and_without_capture() -> None:
    argv, env = vllm_command("/m", port=8123, clt="/clt", target="h:1")
    assert "--worker-extension-cls" in argv and "--enforce-eager" in argv
    assert env["VLLM_PLUGINS"] == "residue" and env["RESIDUE_ENABLED"] == "1" and env["RESIDUE_CLT"] == "/clt"
    argv, env = vllm_command("/m", capture=False)
    assert "--worker-extension-cls" not in argv and env["RESIDUE_DISABLE"] == "1"


def test_pending_messages_leave_in_batches_bounded_by_count_and_size() -> None:
    """The stream sends what is pending as IngestBatches of at most SEND_BATCH messages and about a
    quarter of the message-size limit; a failed send puts a batch back in front, in order."""
    builder: Any = SimpleNamespace(model="m", clt_id="c")
    s = FrameSender(builder, "127.0.0.1:1", max_message_bytes=40_000)
    msgs = [pb.IngestMessage(end=pb.RequestEnd(request_id=f"r{i}")) for i in range(100)]
    s._pending.extend(msgs)
    first = s._next_pending()
    assert [m.end.request_id for m in first] == [f"r{i}" for i in range(sender_mod.SEND_BATCH)]
    s._requeue(first)
    assert list(s._pending) == msgs
    s._pending.clear()
    big = [pb.IngestMessage(end=pb.RequestEnd(request_id="x" * 3000)) for _ in range(10)]  # ~3 kB each
    s._pending.extend(big)
    sizes = []
    while batch := s._next_pending():
        sizes.append(len(batch))
        assert len(batch) == 1 or sum(m.ByteSize() for m in batch) <= 10_000
    assert sum(sizes) == 10 and max(sizes) == 3


def test_encoders_run_on_the_cores_vllm_reserved() -> None:
    """The encoder threads avoid the cores vLLM bound its forward pass to; with none reserved, any core."""
    from residue_monitor.service.plugin.sender import encoder_cpus

    assert encoder_cpus({0}, 2) == {1}
    assert encoder_cpus({0, 1}, 4) == {2, 3}
    assert encoder_cpus({0, 1}, 2) == {0, 1}

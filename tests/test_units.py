"""Unit tests: config, keys, routing, wire codecs, error mapping, accumulation."""

from __future__ import annotations

import asyncio
import email.utils
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llm_broker.ingress import cache
from llm_broker.ingress.auth import OPEN_TENANT, Authenticator
from llm_broker.ingress.replies import Waiter
from llm_broker.shared import messages as m
from llm_broker.shared.config import (
    CacheConfig,
    CircuitConfig,
    ConfigError,
    ModelRoute,
    Router,
    Target,
    hash_key,
    load_config,
    new_key,
    parse_config,
)
from llm_broker.shared.errors import (
    Forbidden,
    Unauthorized,
    UpstreamError,
    retry_after_seconds,
    upstream_status_error,
)
from llm_broker.shared.keys import Keys
from llm_broker.shared.metrics import LATENCY_BUCKETS, FastCount, FastHistogram
from llm_broker.shared.store.records import Result
from llm_broker.workers.accumulate import StreamAccumulator
from llm_broker.workers.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from llm_broker.workers.credentials import KeyRing

PROVIDERS = {"p1": {"type": "openai", "base_url": "https://api.example.com/v1"}}


def test_config_defaults_need_no_file() -> None:
    cfg = load_config(None, {})
    assert cfg.ingress.port == 8000
    assert cfg.ingress.max_body_bytes == 32 * 1024 * 1024
    assert cfg.redis.url == "redis://127.0.0.1:6379/0"


def test_unknown_field_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown field `max_conurrency`"):
        parse_config({"providers": {"p1": {**PROVIDERS["p1"], "max_conurrency": 3}}})
    with pytest.raises(ConfigError, match="unknown field `colour`"):
        parse_config({"colour": "blue"})


def test_wrong_type_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"\$\.ingress\.port"):
        parse_config({"ingress": {"port": "eighty"}})


def test_route_to_unknown_provider_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown provider 'nope'"):
        parse_config({"providers": PROVIDERS, "models": {"m": {"provider": "nope"}}})


def test_bad_key_hash_is_rejected() -> None:
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        parse_config({"auth": {"keys": [{"tenant": "a", "sha256": "abc"}]}})


def test_environment_overrides_redis_url(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("redis: {url: 'redis://file:1/0'}\n")
    assert load_config(str(path), {}).redis.url == "redis://file:1/0"
    env = {"REDIS_URL": "redis://env:2/0", "LLM_BROKER_CONFIG": str(path)}
    assert load_config(None, env).redis.url == "redis://env:2/0"


def test_unreadable_and_invalid_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"), {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad), {})


def test_key_hashing_and_new_keys() -> None:
    assert hash_key("secret") == (
        "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
    )
    key, digest = new_key()
    assert key.startswith("sk-llmb-") and len(key) > 40
    assert hash_key(key) == digest
    assert new_key()[0] != key


async def test_authenticator() -> None:
    key, digest = new_key()
    auth = Authenticator(
        parse_config({"auth": {"keys": [{"tenant": "acme", "sha256": digest}]}}).auth
    )
    assert (await auth.identify({"Authorization": f"Bearer {key}"})).tenant == "acme"
    assert (await auth.identify({"x-api-key": key})).tenant == "acme"
    for header in ("", "Bearer", f"Basic {key}", "Bearer wrong"):
        with pytest.raises(Unauthorized):
            await auth.identify({"Authorization": header})
    for headers in ({}, {"x-api-key": ""}, {"x-api-key": "wrong"}):
        with pytest.raises(Unauthorized):
            await auth.identify(headers)
    assert (await Authenticator(parse_config({}).auth).identify({})).tenant == OPEN_TENANT


async def test_admin_keys_are_for_the_admin_api_only() -> None:
    key, digest = new_key()
    admin_key, admin_digest = new_key()
    auth = Authenticator(
        parse_config(
            {
                "auth": {
                    "keys": [{"tenant": "acme", "sha256": digest}],
                    "admin_keys": [{"name": "ops", "sha256": admin_digest}],
                }
            }
        ).auth
    )
    assert (await auth.admin({"x-api-key": admin_key})).name == "ops"
    with pytest.raises(Forbidden):
        await auth.admin({"x-api-key": key})
    with pytest.raises(Forbidden):
        await auth.identify({"x-api-key": admin_key})
    with pytest.raises(Unauthorized):
        await auth.admin({})


def test_routing_exact_prefix_and_unknown() -> None:
    cfg = parse_config(
        {
            "providers": {**PROVIDERS, "p2": {"type": "mock", "base_url": "http://127.0.0.1:1/v1"}},
            "models": {
                "gpt-4o": {"provider": "p1", "model": "gpt-4o-2024-08-06"},
                "mock*": {"provider": "p2"},
                "mock-special*": {"provider": "p1"},
            },
        }
    )
    router = Router(cfg)

    def targets(model: str) -> tuple[Target, ...] | None:
        found = router.candidates(model)
        return found.targets if found else None

    assert targets("gpt-4o") == (Target("p1", "gpt-4o-2024-08-06"),)
    assert targets("mock-slow") == (Target("p2", "mock-slow"),)
    assert targets("mock-special-1") == (Target("p1", "mock-special-1"),)
    assert targets("gpt-5") is None


def test_job_codec_round_trip() -> None:
    job = m.Job(
        id="ab" * 16,
        tenant="t",
        provider="p",
        model="m",
        upstream_model="u",
        stream=True,
        include_usage=True,
        reply_to="r:x",
        deadline=2.5,
        created=1.5,
        body=b'{"model":"m"}',
        traceparent="00-abc-def-01",
    )
    assert m.job_decoder.decode(m.job_encoder.encode(job)) == job


def test_job_decoder_tolerates_fields_from_newer_versions() -> None:
    newer = {
        "id": "x",
        "tenant": "t",
        "provider": "p",
        "model": "m",
        "upstream_model": "u",
        "deadline": 1.0,
        "created": 0.0,
        "body": b"{}",
        "shard": 5,
    }
    job = m.job_decoder.decode(msgspec.msgpack.encode(newer))
    assert job.id == "x" and job.stream is False and job.reply_to == ""


def test_chat_request_decoding_keeps_only_what_ingress_needs() -> None:
    req = m.chat_request_decoder.decode(
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.2,'
        b'"stream":true,"stream_options":{"include_usage":true}}'
    )
    assert req.stream and req.stream_options and req.stream_options.include_usage
    with pytest.raises(msgspec.ValidationError, match="messages"):
        m.chat_request_decoder.decode(b'{"model":"m"}')


@pytest.mark.parametrize(
    ("upstream", "client", "etype"),
    [
        (400, 400, "invalid_request_error"),
        (404, 404, "invalid_request_error"),
        (422, 422, "invalid_request_error"),
        (429, 429, "rate_limit_error"),
        (401, 502, "upstream_error"),
        (403, 502, "upstream_error"),
        (500, 502, "server_error"),
        (503, 502, "upstream_error"),
        (504, 504, "timeout"),
    ],
)
def test_upstream_error_mapping(upstream: int, client: int, etype: str) -> None:
    payload = {"error": {"message": "boom", "type": "server_error" if upstream == 500 else None}}
    if upstream == 429:
        payload["error"]["type"] = "rate_limit_error"
    err = upstream_status_error(upstream, payload)
    assert err.http_status == client
    body = msgspec.to_builtins(err.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == etype


def test_upstream_error_without_json_body() -> None:
    err = upstream_status_error(500, None)
    assert err.http_status == 502
    assert "HTTP 500" in err.message


def test_stream_accumulator_rebuilds_content_tool_calls_and_usage() -> None:
    acc = StreamAccumulator()
    acc.add(
        {"created": 7, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    )
    acc.add({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
    acc.add({"choices": [{"index": 0, "delta": {"content": "lo"}}]})
    acc.add(
        {
            "choices": [
                {
                    "index": 1,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "function": {"name": "get", "arguments": '{"a"'},
                            }
                        ]
                    },
                }
            ]
        }
    )
    acc.add(
        {
            "choices": [
                {
                    "index": 1,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                    "finish_reason": "tool_calls",
                }
            ]
        }
    )
    acc.add({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    acc.add(
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    )
    out = acc.result("id-1", "model-a", 1)
    assert out["created"] == 7
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert out["choices"][0]["finish_reason"] == "stop"
    call = out["choices"][1]["message"]["tool_calls"][0]
    assert call == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get", "arguments": '{"a": 1}'},
    }
    assert out["choices"][1]["message"]["content"] is None
    assert out["usage"]["total_tokens"] == 5


@pytest.mark.parametrize(
    "command",
    [
        ("PING",),
        ("SET", "key", b"\x00\xffbytes", "EX", 30),
        ("EVALSHA", "ab" * 20, 2, "k1", "k2", 1.5, 1795736447.587850, -3, "ünïcode"),
        ("XINFO GROUPS", "stream"),
        (b"CLIENT SETNAME", b"name"),
    ],
)
def test_hiredis_packing_matches_redis_py(command: tuple[str | bytes | int | float, ...]) -> None:
    from redis.asyncio import Connection

    from llm_broker.shared.redisio import _Connection

    expected = b"".join(Connection().pack_command(*command))
    assert _Connection().pack_command(*command) == [expected]
    assert _Connection().pack_commands([command, command]) == [expected + expected]


def test_job_ids_are_128_bit_hex_and_unique() -> None:
    from llm_broker.ingress.ids import JobIds

    ids = JobIds()
    seen = {ids.next() for _ in range(1000)}  # spans several pages of randomness
    assert len(seen) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in seen)


@pytest.mark.parametrize("path", ["deploy/config.example.yaml", "deploy/compose/config.yaml"])
def test_the_shipped_configs_load(path: str) -> None:
    config = load_config(str(Path(__file__).parent.parent / path), {})
    assert config.providers
    # Webhooks are signed: with one secret for all, or one per tenant.
    assert config.webhooks.secret_file or config.webhooks.tenant_secret_files


# ---------------------------------------------------------------- providers, routing, cache


@pytest.mark.parametrize(
    ("providers", "models", "found"),
    [
        ({"az": {"type": "azure", "base_url": "https://x.example"}}, {}, "api_version"),
        (PROVIDERS, {"m": {"provider": "p1", "deployments": [{"provider": "p1"}]}}, "either"),
        (PROVIDERS, {"m": {}}, "either"),
        (PROVIDERS, {"m": {"deployments": [{"provider": "nope"}]}}, "unknown provider"),
        (PROVIDERS, {"m": {"deployments": [{"provider": "p1", "weight": -1}]}}, "weight"),
        (PROVIDERS, {"m": {"provider": "p1", "strategy": "fastest"}}, "strategy"),
        ({"p1": {**PROVIDERS["p1"], "rpm": 0}}, {}, "rpm"),
        (PROVIDERS, {"m*": {"deployments": [{"provider": "p1", "rpm": 5}]}}, "needs a model"),
        ({"p1": {**PROVIDERS["p1"], "type": "watsonx"}}, {}, "type"),
    ],
)
def test_routing_config_errors_name_the_field(
    providers: dict[str, Any], models: dict[str, Any], found: str
) -> None:
    with pytest.raises(ConfigError, match=found):
        parse_config({"providers": providers, "models": models})


def test_deployments_keep_their_order_and_weights() -> None:
    cfg = parse_config(
        {
            "providers": {**PROVIDERS, "p2": PROVIDERS["p1"]},
            "models": {
                "m": {
                    "strategy": "least-queued",
                    "deployments": [
                        {"provider": "p2", "model": "big", "weight": 3},
                        {"provider": "p1"},
                    ],
                }
            },
        }
    )
    found = Router(cfg).candidates("m")
    assert found is not None
    assert found.targets == (Target("p2", "big"), Target("p1", "m"))
    assert found.weights == (3.0, 1.0)
    assert found.route.strategy == "least-queued"


def test_retry_after_forms() -> None:
    assert retry_after_seconds("7", None) == 7.0
    assert retry_after_seconds("7", "1500") == 1.5  # the finer one wins
    assert retry_after_seconds(None, "250") == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    seconds = retry_after_seconds(future, None)
    assert seconds is not None and 28 <= seconds <= 31
    assert retry_after_seconds("soon", None) is None
    assert retry_after_seconds(None, None) is None
    err = upstream_status_error(429, None, "2", None)
    assert err.retryable and err.retry_after_s == 2.0
    assert upstream_status_error(503, None).retryable
    assert not upstream_status_error(400, None).retryable
    assert not upstream_status_error(401, None).retryable


def test_circuit_breaker_opens_half_opens_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    registry = CollectorRegistry()
    state = Gauge("s", "s", registry=registry)
    opened = Counter("o", "o", registry=registry)
    b = Breaker(CircuitConfig(failures=2, open_s=10), state, opened)
    b.failure()
    assert b.allow() and b.state == CLOSED
    b.failure()
    assert b.state == OPEN and b.refusing() and not b.allow()
    now[0] += 10
    assert not b.refusing()
    assert b.allow() and b.state == HALF_OPEN  # the probe
    assert b.refusing()
    assert not b.allow()  # only one
    b.failure()
    assert b.state == OPEN and not b.allow()
    now[0] += 10
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow() and b.allow()
    assert registry.get_sample_value("o_total") == 2


def test_key_ring_rotates_and_rereads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text("k1\nk2\n")
    two.write_text("k3\n")
    ring = KeyRing("p", (str(one), str(two)))
    assert [ring.next() for _ in range(4)] == ["k1", "k2", "k3", "k1"]
    one.write_text("k9\n")
    os.utime(one, ns=(1, 1))  # a new stamp, as a rewritten file has
    assert ring.next() in ("k2", "k3")  # not re-checked within the second
    now[0] += 1.5
    assert {ring.next() for _ in range(2)} == {"k9", "k3"}
    one.unlink()
    now[0] += 1.5
    assert {ring.next() for _ in range(2)} == {"k9", "k3"}  # last keys kept
    empty = KeyRing("p", (str(tmp_path / "missing"),))
    with pytest.raises(UpstreamError, match="no API key"):
        empty.next()


def test_cache_plan_rules() -> None:
    cfg = CacheConfig(enabled=True)
    keys = Keys("t:")
    route = ModelRoute(provider="p1")

    def plan_for(body: dict[str, Any], kind: str = m.CHAT, **headers: str) -> Any:
        request = make_mocked_request("POST", "/", headers=headers)
        return cache.plan(request, cfg, keys, "acme", kind, body, route)

    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    zero = plan_for({**base, "temperature": 0})
    assert zero is not None and zero.read and zero.key.startswith("t:cache:acme:")
    assert plan_for({**base, "temperature": 0, "stream": True}).key == zero.key
    assert plan_for({**base}) is None  # the default temperature samples
    assert plan_for({**base, "temperature": 0.5}) is None
    assert plan_for({**base, "temperature": 0}, **{"Cache-Control": "no-store"}) is None
    assert not plan_for({**base, "temperature": 0}, **{"Cache-Control": "no-cache"}).read
    assert plan_for({"model": "m", "input": "x"}, m.EMBEDDINGS) is not None
    sampled = cache.plan(
        make_mocked_request("POST", "/"),
        cfg,
        keys,
        "acme",
        m.CHAT,
        {**base, "temperature": 0.5},
        ModelRoute(provider="p1", cache_sampling=True),
    )
    assert sampled is not None
    off = cache.plan(
        make_mocked_request("POST", "/"), CacheConfig(), keys, "acme", m.CHAT, base, route
    )
    assert off is None


def test_cached_completion_replays_as_chunks() -> None:
    completion = {
        "id": "c1",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    chunks, closing = cache.sse_replay(completion, include_usage=True)
    frames = [orjson.loads(f[6:]) for f in chunks.split(b"\n\n") if f]
    assert [f["choices"][0]["delta"].get("content") for f in frames] == ["hi", None]
    assert frames[-1]["choices"][0]["finish_reason"] == "stop"
    assert orjson.loads(closing[6:])["usage"] == completion["usage"]
    assert cache.sse_replay(completion, include_usage=False)[1] == b""


def test_text_log_fields_and_messages_stay_on_one_line() -> None:
    import logging

    from llm_broker.shared.logs import TextFormatter

    record = logging.LogRecord(
        "llm_broker.worker", logging.INFO, "f", 1, "moved on to %s", None, None
    )
    record.args = ("mock/x\nforged",)
    record.fields = {"model": "evil\n2026-01-01 INFO forged status=200", "status": 200}
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert 'model="evil\\n2026-01-01 INFO forged status=200"' in line
    assert line.endswith("status=200") and "moved on to mock/x\\nforged" in line


def test_a_text_lines_values_are_rendered_the_same_when_remembered_and_stay_bounded() -> None:
    """The text log's rendered values are remembered (tenants, models and endpoints
    repeat), with the same line each time, and a client sending new values every
    time cannot grow what is remembered past its bound."""
    from llm_broker.shared import logs

    fields = {"model": "gpt x\nforged=1", "tenant": "acme", "status": 200, "route": None}
    first = logs.text_pairs(fields)
    assert first == 'model="gpt x\\nforged=1" tenant=acme status=200'
    assert logs.text_pairs(fields) == first
    for i in range(logs.MAX_RENDERED * 2 + 3):
        assert logs.text_pairs({"model": f"m {i}"}) == f'model="m {i}"'
    assert len(logs._RENDERED) <= logs.MAX_RENDERED


def test_the_hot_paths_metric_updates_expose_what_prometheus_clients_own_do() -> None:
    """FastCount and FastHistogram add to the same values as inc and observe: the
    same exposition for the same updates, bounds, zero, past the last bound and NaN
    included."""

    def metrics(registry: CollectorRegistry) -> tuple[Counter, Gauge, Histogram]:
        return (
            Counter("jobs", "jobs", ["outcome"], registry=registry),
            Gauge("in_flight", "in flight", ["provider"], registry=registry),
            Histogram(
                "seconds", "seconds", ["provider"], buckets=LATENCY_BUCKETS, registry=registry
            ),
        )

    amounts = [0.0, 0.005, 0.0051, 0.3, 1.0, 599.9, 600.0, 601.0, 1e9, float("nan"), 2.5]
    public, fast = CollectorRegistry(), CollectorRegistry()
    counter, gauge, histogram = metrics(public)
    f_counter, f_gauge, f_histogram = metrics(fast)
    count, level = FastCount(f_counter.labels("completed")), FastCount(f_gauge.labels("p"))
    seconds = FastHistogram(f_histogram.labels("p"))
    for amount in amounts:
        counter.labels("completed").inc(3)
        count.inc(3)
        gauge.labels("p").inc()
        level.inc(1)
        histogram.labels("p").observe(amount)
        seconds.observe(amount)
    gauge.labels("p").dec()
    level.dec()

    def exposed(registry: CollectorRegistry) -> list[bytes]:  # (creation times differ)
        return [x for x in generate_latest(registry).splitlines() if b"_created" not in x]

    assert exposed(fast) == exposed(public)
    assert b'seconds_bucket{le="0.005",provider="p"} 2.0' in exposed(fast)


def test_an_upstreams_negative_token_count_never_lowers_the_counters() -> None:
    """The worker's token and cost counters only go up, whatever an upstream says:
    its usage is read as 0 tokens where it reports fewer."""
    from llm_broker.shared.config import parse_config
    from llm_broker.shared.metrics import WorkerMetrics
    from llm_broker.workers.native import message_usage, response_usage
    from llm_broker.workers.shaping import Accounting, usage_of
    from tests.helpers import make_job

    registry = CollectorRegistry()
    config = parse_config(
        {"pricing": {"mock": {"input_usd_per_million": 1, "output_usd_per_million": 2}}}
    )
    accounting = Accounting(config, "mock", WorkerMetrics(registry))
    job = make_job()
    honest = usage_of({"usage": {"prompt_tokens": 10, "completion_tokens": 5}})
    hostile = usage_of({"usage": {"prompt_tokens": -1000, "completion_tokens": -7}})
    assert honest is not None and hostile is not None
    accounting.count(job, honest)
    accounting.count(job, hostile)
    assert message_usage({"input_tokens": -3, "output_tokens": -1}) == hostile
    assert response_usage({"usage": {"input_tokens": -9, "output_tokens": -2}}) == hostile

    def tokens(kind: str) -> float | None:
        labels = {"model": job.route or job.model, "provider": "mock", "type": kind}
        return registry.get_sample_value("llm_broker_tokens_total", labels)

    assert (tokens("input"), tokens("output"), tokens("total")) == (10.0, 5.0, 15.0)
    cost = registry.get_sample_value(
        "llm_broker_cost_usd_total",
        {"model": job.route or job.model, "provider": "mock", "tenant": "other"},
    )
    assert cost == pytest.approx(20 / 1_000_000)


def _bench_script(name: str) -> Any:
    """bench/<name>.py, loaded from its file (bench/ is a folder of scripts, which
    import each other as top-level modules)."""
    import importlib.util

    folder = Path(__file__).resolve().parent.parent / "bench"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def _bench_ab() -> Any:
    return _bench_script("ab")


def test_the_ab_report_says_when_the_machine_was_too_noisy_to_decide() -> None:
    ab = _bench_ab()
    figures = ab.Figures
    quiet = [
        (figures(5245, 1.10, 116, 97, 55), figures(8164, 0.69, 76, 57, 48)),
        (figures(5100, 1.12, 118, 100, 55), figures(8200, 0.68, 76, 56, 48)),
        (figures(5262, 1.09, 114, 97, 55), figures(8240, 0.70, 75, 57, 47)),
    ]
    lines = ab.report(quiet)
    assert "Spread of the pairs: CPU 0.66-0.68, added p50 at c=1 0.61-0.64" in lines[-1]
    assert "the earlier build alone 266-273 µs per request" in lines[-1]
    # One pair on a busy minute: the earlier build's CPU moved by more than a tenth.
    noisy = [*quiet, (figures(2173, 3.62, 253, 230, 110), figures(5633, 1.19, 108, 83, 62))]
    text = "\n".join(ab.report(noisy))
    assert "The machine was noisy" in text and "moved by 123% between pairs" in text
    assert "CPU 0.43-0.68" in text


def test_the_interleaved_report_gives_each_rounds_ratios_and_their_medians() -> None:
    interleave = _bench_script("interleave")
    r = interleave.Round
    rounds = [
        (r(1000.0, 1400.0, 2.8), r(650.0, 2300.0, 1.3)),
        (r(900.0, 1500.0, 2.5), r(630.0, 2250.0, 1.25)),
        (r(1040.0, 1300.0, 3.0), r(580.0, 2500.0, 1.2)),
    ]
    lines = interleave.report(rounds)
    assert "| 1 | 1000, 650 | 0.65 | 2.800, 1.300 ms | 0.46 | 1,400, 2,300 |" in lines
    text = "\n".join(lines)
    # the medians of each build (1000 and 630), their ratio, and the rounds' ratios
    assert "| CPU µs per request at c=64 | 1000 | 630 | 0.63 | 0.65 (0.56-0.70) |" in text
    assert "| added p50 at c=1 (ms) | 2.800 | 1.250 | 0.45 | 0.46 (0.40-0.50) |" in text


async def test_a_call_whose_admission_failed_gets_the_replies_that_came_then_the_error() -> None:
    """A synchronous call waits on its replies alone; its admission's failure wakes it.
    A reply that came before the failure is read first (the job ran: its client gets
    the answer), and the failure ends a wait that would otherwise last to the deadline."""
    loop = asyncio.get_running_loop()
    came = Waiter(loop)
    came.put(Result(b"{}", None))
    came.fail(ValueError("not admitted"))
    assert await came.get() == Result(b"{}", None)
    with pytest.raises(ValueError, match="not admitted"):
        await asyncio.wait_for(came.get(), 1)

    waiting = Waiter(loop)
    get = asyncio.ensure_future(waiting.get())  # (its first step runs before the failure)
    loop.call_soon(waiting.fail, ValueError("refused"))
    with pytest.raises(ValueError, match="refused"):
        await asyncio.wait_for(get, 1)

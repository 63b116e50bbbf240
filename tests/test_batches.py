"""Batches on the broker's queue, through the official SDKs: OpenAI Files + Batches
and Anthropic Message Batches, run by real worker processes against the mock."""

from __future__ import annotations

import contextlib
import signal
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from llm_broker.dev import free_port
from llm_broker.shared.config import new_key
from tests.conftest import ConfigFactory, Procs, Receiver, mock_stats
from tests.helpers import eventually, loopback_webhooks
from tests.test_observability import scrape, value

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _config(
    make_config: ConfigFactory,
    mock_url: str,
    tmp_path: Path,
    sections: dict[str, Any] | None = None,
    **files: Any,
) -> Path:
    return make_config(
        mock_url,
        providers={
            "mock-anthropic": {
                "type": "anthropic",
                "base_url": f"{mock_url}/v1",
                "max_concurrency": 64,
                "retry": {"max_retries": 0},
                "circuit": {"failures": 1_000_000},
            }
        },
        models={
            "mock*": {"provider": "mock"},
            "gpt-4o-mini": {"provider": "mock", "model": "mock"},
            "claude-test": {"provider": "mock-anthropic", "model": "mock"},
            "claude-slow": {"provider": "mock-anthropic", "model": "mock-latency-500"},
            "claude-broken": {"provider": "mock-anthropic", "model": "mock-error-500"},
        },
        files={"dir": str(tmp_path / "files"), **files},
        **(sections or {}),
    )


def _chat_line(cid: str, model: str, content: str) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}]},
    }


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def _parse(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


async def _openai(url: str, closing: contextlib.AsyncExitStack) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    closing.push_async_callback(client.close)
    return client


@pytest.fixture
async def closing() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as stack:
        yield stack


async def _until_completed(
    client: openai.AsyncOpenAI, batch_id: str, count: int, timeout: float = 30
) -> None:
    """Wait until at least ``count`` of the batch's lines completed."""

    async def done() -> bool:
        got = await client.batches.retrieve(batch_id)
        return bool(got.request_counts and got.request_counts.completed >= count)

    await eventually(done, timeout, what=f"{count} lines of batch {batch_id} to complete")


async def _until_final(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 60) -> Any:
    async def final() -> Any:
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in TERMINAL else None

    return await eventually(final, timeout, what=f"batch {batch_id} to end")


async def test_a_chat_batch_through_the_openai_sdk(
    procs: Procs,
    make_config: ConfigFactory,
    closing: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, tmp_path, window=32)
    procs.worker(config)
    _, url = procs.ingress(config)
    lines = []
    for i in range(200):
        model = "gpt-4o-mini"
        if i % 20 == 3:
            model = "no-such-model"
        elif i % 20 == 7:
            model = "mock-error-500"
        lines.append(_chat_line(f"line-{i}", model, f"request number {i}"))
    client = await _openai(url, closing)
    uploaded = await client.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "test"},
    )
    assert batch.status == "validating" and batch.metadata == {"run": "test"}
    done = await _until_final(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (200, 180)
    assert done.request_counts.failed == 20
    assert done.output_file_id and done.error_file_id
    output = _parse((await client.files.content(done.output_file_id)).read())
    errors = _parse((await client.files.content(done.error_file_id)).read())
    ids = [o["custom_id"] for o in output + errors]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
    # The answers are the mock's: the same as a direct call with the same request.
    async with http.post(
        f"{mock_url}/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "request number 0"}]},
    ) as r:
        direct = await r.json()
    first = next(o for o in output if o["custom_id"] == "line-0")
    assert first["response"]["status_code"] == 200 and first["error"] is None
    assert first["id"].startswith("batch_req_") and first["response"]["request_id"]
    body = first["response"]["body"]
    assert body["choices"][0]["message"] == direct["choices"][0]["message"]
    for o in output:
        assert o["response"]["body"]["object"] == "chat.completion"
    codes = {e["custom_id"]: e["response"]["status_code"] for e in errors}
    assert {codes[f"line-{i}"] for i in range(3, 200, 20)} == {404}
    # What a synchronous call gets for an upstream 500: 502 (upstream_error).
    assert {codes[f"line-{i}"] for i in range(7, 200, 20)} == {502}
    stats = await mock_stats(http, mock_url)
    assert stats["completed"] >= 180 + 1
    listed = await client.batches.list(limit=5)
    assert [b.id for b in listed.data] == [batch.id]


async def test_embeddings_lines_and_a_cancelled_batch(
    procs: Procs,
    make_config: ConfigFactory,
    closing: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, tmp_path, window=4)
    procs.worker(config)
    _, url = procs.ingress(config)
    client = await _openai(url, closing)
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": model, "input": f"text {i}"},
        }
        for i, model in enumerate(["gpt-4o-mini"] * 20 + ["no-such-model", "mock-error-500"])
    ]
    uploaded = await client.files.create(file=("e.jsonl", _jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = await _until_final(client, batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (20, 2)
    assert done.output_file_id is not None and done.error_file_id is not None
    output = _parse((await client.files.content(done.output_file_id)).read())
    assert sorted(o["custom_id"] for o in output) == sorted(f"e{i}" for i in range(20))
    assert all(len(o["response"]["body"]["data"][0]["embedding"]) == 8 for o in output)
    errors = _parse((await client.files.content(done.error_file_id)).read())
    assert {e["custom_id"]: e["response"]["status_code"] for e in errors} == {
        "e20": 404,
        "e21": 502,
    }

    # A slow batch cancelled while it runs keeps the lines that finished.
    slow = [_chat_line(f"s{i}", "mock-latency-400", f"slow {i}") for i in range(40)]
    uploaded = await client.files.create(file=("s.jsonl", _jsonl(slow)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    await _until_completed(client, batch.id, 4)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    done = await _until_final(client, batch.id)
    assert done.status == "cancelled" and done.request_counts is not None
    assert 4 <= done.request_counts.completed < 40
    assert done.output_file_id is not None
    output = _parse((await client.files.content(done.output_file_id)).read())
    assert len(output) == done.request_counts.completed
    assert len({o["custom_id"] for o in output}) == len(output)


async def test_message_batches_through_the_anthropic_sdk(
    procs: Procs, make_config: ConfigFactory, closing: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, tmp_path, window=50)
    procs.worker(config)
    _, url = procs.ingress(config)
    client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
    closing.push_async_callback(client.close)
    requests: list[Any] = [
        {
            "custom_id": f"r{i}",
            "params": {
                "model": "claude-test",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": f"hello {i}"}],
            },
        }
        for i in range(100)
    ]
    batch = await client.messages.batches.create(requests=requests)
    assert batch.processing_status == "in_progress" and batch.type == "message_batch"

    async def ended() -> Any:
        got = await client.messages.batches.retrieve(batch.id)
        return got if got.processing_status == "ended" else None

    done = await eventually(ended, 60, what="the message batch to end")
    assert done.request_counts.succeeded == 100 and done.request_counts.errored == 0
    results = [r async for r in await client.messages.batches.results(batch.id)]
    assert sorted(r.custom_id for r in results) == sorted(f"r{i}" for i in range(100))
    for r in results:
        assert r.result.type == "succeeded"
        assert r.result.message.role == "assistant" and r.result.message.content
    listed = await client.messages.batches.list()
    assert [b.id for b in listed.data] == [batch.id]
    deleted = await client.messages.batches.delete(batch.id)
    assert deleted.type == "message_batch_deleted"


@pytest.mark.chaos
async def test_a_batch_survives_a_killed_worker_and_a_restarted_ingress(
    procs: Procs,
    make_config: ConfigFactory,
    closing: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, tmp_path, window=8)
    worker = procs.worker(config)
    ingress, url = procs.ingress(config)
    client = await _openai(url, closing)
    lines = [_chat_line(f"k{i}", "mock-latency-100", f"kill {i}") for i in range(120)]
    uploaded = await client.files.create(file=("k.jsonl", _jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    await _until_completed(client, batch.id, 20)
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait()
    ingress.stop(timeout=10)
    procs.worker(config)  # a new worker takes the batch over once the lease lapses
    _, url = procs.ingress(config)
    client = await _openai(url, closing)
    done = await _until_final(client, batch.id, timeout=90)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 120
    assert done.output_file_id is not None
    output = _parse((await client.files.content(done.output_file_id)).read())
    assert sorted(o["custom_id"] for o in output) == sorted(f"k{i}" for i in range(120))


async def test_a_batch_end_is_a_signed_webhook_event(
    procs: Procs,
    make_config: ConfigFactory,
    closing: contextlib.AsyncExitStack,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    _, mock_url = procs.mock()
    webhooks = loopback_webhooks(tmp_path)
    with open(webhooks["secret_file"]) as f:  # noqa: ASYNC230 (a small local file, once)
        secret = f.read().strip()
    config = _config(make_config, mock_url, tmp_path, {"webhooks": webhooks}, window=8)
    metrics_port = free_port()
    procs.worker(config, "--metrics-port", str(metrics_port))
    procs.webhooks(config)
    _, url = procs.ingress(config)
    client = await _openai(url, closing)
    lines = [_chat_line(f"w{i}", "gpt-4o-mini", f"hook {i}") for i in range(5)]
    uploaded = await client.files.create(file=("w.jsonl", _jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"webhook_url": f"{receiver.url}/batch"},
    )
    (delivery,) = await receiver.deliveries("batch", 1)
    event = Webhook(secret).verify(delivery.body, delivery.headers)
    assert event["type"] == "batch.completed"
    assert event["data"]["id"] == batch.id and event["data"]["status"] == "completed"
    assert event["data"]["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert delivery.headers["webhook-id"] == f"msg_{batch.id}"
    # The worker counts the batch and its lines.
    async with aiohttp.ClientSession() as http:
        samples, _ = await scrape(http, f"http://127.0.0.1:{metrics_port}/metrics")
    assert value(samples, "llm_broker_batches_total", api="openai", status="completed") == 1
    assert value(samples, "llm_broker_batch_lines_total", outcome="completed") == 5
    assert value(samples, "llm_broker_batches_running") == 0


def _peak_kib(pid: int) -> int:
    """Peak resident set size of process ``pid`` (``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for process {pid}")


@pytest.mark.scale
@pytest.mark.timeout(600)
async def test_a_50000_line_batch_keeps_memory_bounded_and_interactive_calls_fast(
    procs: Procs,
    make_config: ConfigFactory,
    closing: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The issue's scale test: a 0 ms mock, 50,000 lines, interactive calls during it."""
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, tmp_path)
    worker = procs.worker(config)
    ingress, url = procs.ingress(config)
    client = await _openai(url, closing)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "quick"}]}

    async def interactive(n: int) -> list[float]:
        took = []
        for _ in range(n):
            started = time.perf_counter()
            async with http.post(f"{url}/v1/chat/completions", json=chat) as r:
                assert r.status == 200
                await r.read()
            took.append(time.perf_counter() - started)
        return took

    alone = statistics.median(await interactive(50))
    total = 50_000
    data = b"".join(
        orjson.dumps(_chat_line(f"s{i}", "gpt-4o-mini", f"scale {i}")) + b"\n" for i in range(total)
    )
    uploaded = await client.files.create(file=("big.jsonl", data), purpose="batch")
    del data
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    await _until_completed(client, batch.id, 1000, timeout=60)
    during = statistics.median(await interactive(50))
    done = await _until_final(client, batch.id, timeout=400)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == total
    peaks = {"ingress": _peak_kib(ingress.pid), "worker": _peak_kib(worker.pid)}
    print(f"interactive p50 alone {alone * 1000:.1f} ms, during {during * 1000:.1f} ms; "
          f"peak RSS KiB {peaks}")  # fmt: skip
    # Interactive calls go first in the scheduler: the batch adds little to them.
    assert during <= alone + 0.1, (alone, during)
    assert all(kib < 250 * 1024 for kib in peaks.values()), peaks
    assert done.output_file_id is not None
    seen = 0
    async with http.get(f"{url}/v1/files/{done.output_file_id}/content") as r:
        async for chunk in r.content.iter_chunked(1 << 16):
            seen += chunk.count(b"\n")
    assert seen == total


async def test_lines_not_done_when_the_window_ends_are_expired_and_batches_are_limited(
    procs: Procs,
    make_config: ConfigFactory,
    closing: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    _, mock_url = procs.mock()
    config = _config(
        make_config, mock_url, tmp_path, window=2, completion_window_s=3, max_batches_in_progress=1
    )
    procs.worker(config)
    _, url = procs.ingress(config)
    client = await _openai(url, closing)
    # Two lines at a time, 1 s each, for a 3 s window: about 6 of 30 finish.
    lines = [_chat_line(f"x{i}", "mock-latency-1000", f"late {i}") for i in range(30)]
    uploaded = await client.files.create(file=("x.jsonl", _jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # One batch in progress per tenant here: a second one waits its turn.
    with pytest.raises(openai.RateLimitError) as refused:
        await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert refused.value.code == "too_many_batches"
    done = await _until_final(client, batch.id, timeout=30)
    assert done.status == "expired" and done.expired_at is not None
    assert done.request_counts is not None
    finished = done.request_counts.completed
    assert 1 <= finished < 30 and done.request_counts.failed == 30 - finished
    output = _parse((await client.files.content(done.output_file_id or "")).read())
    assert done.error_file_id is not None
    errors = _parse((await client.files.content(done.error_file_id)).read())
    assert len(output) == finished
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sorted(o["custom_id"] for o in output + errors) == sorted(f"x{i}" for i in range(30))


async def test_message_batch_checks_and_a_cancel_that_answers_every_request(
    procs: Procs, make_config: ConfigFactory, closing: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, tmp_path, window=2, max_lines=50)
    procs.worker(config)
    _, url = procs.ingress(config)
    client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
    closing.push_async_callback(client.close)

    def request(i: int, **extra: Any) -> Any:
        params = {"model": "claude-test", "max_tokens": 16, **extra}
        params["messages"] = [{"role": "user", "content": f"q {i}"}]
        return {"custom_id": f"c{i}", "params": params}

    for bad, why in (
        ([request(0, stream=True)], "stream"),
        ([request(i) for i in range(51)], "1 to 50"),
        ([request(0), request(0)], "used twice"),
    ):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.batches.create(requests=bad)
        assert why in str(refused.value)
    slow = [request(i) | {"params": {**request(i)["params"], "model": "claude-slow"}}
            for i in range(30)]  # fmt: skip
    batch = await client.messages.batches.create(requests=slow)
    assert batch.request_counts.processing == 30
    await client.messages.batches.cancel(batch.id)

    async def ended() -> Any:
        got = await client.messages.batches.retrieve(batch.id)
        return got if got.processing_status == "ended" else None

    done = await eventually(ended, 30, what="the cancelled batch to end")
    counts = done.request_counts
    assert counts.canceled + counts.succeeded == 30 and counts.canceled > 0, counts
    results = [r async for r in await client.messages.batches.results(batch.id)]
    assert sorted(r.custom_id for r in results) == sorted(f"c{i}" for i in range(30))
    assert {r.result.type for r in results} <= {"succeeded", "canceled"}


async def test_a_batch_line_may_use_only_its_key_s_models(
    procs: Procs, make_config: ConfigFactory, closing: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    _, mock_url = procs.mock()
    admin_key, admin_sha = new_key()
    config = _config(
        make_config,
        mock_url,
        tmp_path,
        {"auth": {"open": False, "admin_keys": [{"name": "ops", "sha256": admin_sha}]}},
    )
    procs.worker(config)
    _, url = procs.ingress(config)
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with aiohttp.ClientSession(headers=admin) as http:
        async with http.post(f"{url}/admin/v1/tenants", json={"name": "acme"}) as r:
            assert r.status == 201
        async with http.post(
            f"{url}/admin/v1/keys", json={"tenant": "acme", "models": ["gpt-4o-mini"]}
        ) as r:
            key = (await r.json())["key"]
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    closing.push_async_callback(client.close)
    lines = [_chat_line("ok", "gpt-4o-mini", "fine"), _chat_line("no", "mock-fast", "not mine")]
    uploaded = await client.files.create(file=("m.jsonl", _jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await _until_final(client, batch.id)
    assert done.request_counts is not None and done.request_counts.completed == 1
    errors = _parse((await client.files.content(done.error_file_id or "")).read())
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("no", 403)]
    assert errors[0]["response"]["body"]["error"]["code"] == "model_not_allowed"


async def test_message_batch_results_of_every_type(
    procs: Procs, make_config: ConfigFactory, closing: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    """succeeded, errored (the upstream fails) and expired (the window ends first)."""
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, tmp_path, window=2, completion_window_s=3)
    procs.worker(config)
    _, url = procs.ingress(config)
    client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
    closing.push_async_callback(client.close)
    models = ["claude-test", "claude-broken"] + ["claude-slow"] * 20
    requests: list[Any] = [
        {
            "custom_id": f"t{i}",
            "params": {
                "model": model,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"t {i}"}],
            },
        }
        for i, model in enumerate(models)
    ]
    batch = await client.messages.batches.create(requests=requests)

    async def ended() -> Any:
        got = await client.messages.batches.retrieve(batch.id)
        return got if got.processing_status == "ended" else None

    done = await eventually(ended, 30, what="the batch's window to end")
    counts = done.request_counts
    assert counts.errored == 1 and counts.expired > 0 and counts.canceled == 0, counts
    assert counts.succeeded + counts.errored + counts.expired == len(models)
    results = {r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)}
    assert len(results) == len(models)
    assert results["t0"].type == "succeeded"
    assert results["t1"].type == "errored"
    assert results["t1"].error.error.type == "api_error"
    assert {r.type for r in results.values()} == {"succeeded", "errored", "expired"}

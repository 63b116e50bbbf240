"""The batch APIs on the broker's queue: OpenAI Batches (``/v1/batches``, over files
uploaded with the Files API) and Anthropic Message Batches (``/v1/messages/batches``,
requests in the body). Ingress records a batch; the batch driver in the worker
processes runs its lines as jobs of class ``batch`` (workers/batches.py)."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import orjson
from aiohttp import web

from llm_broker.ingress.admission import identify, redis_call
from llm_broker.ingress.bodies import (
    decode_body,
    decode_messages,
    json_response,
    limit_query,
    load_json,
    read_json_body,
)
from llm_broker.ingress.context import CONTEXT
from llm_broker.ingress.jobs import check_webhook
from llm_broker.ingress.state import STATE, State
from llm_broker.shared import batches
from llm_broker.shared.accounts import Principal
from llm_broker.shared.batches import (
    ENDPOINTS,
    FINAL,
    MESSAGES,
    Batch,
    BatchStore,
    Spec,
    TooManyBatches,
    new_batch_id,
    openai_object,
)
from llm_broker.shared.errors import BadRequest, NotFound, QueueFull
from llm_broker.shared.files import FileRecord, TooLarge, new_file_id

MAX_REQUESTS = 100_000


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    #: The broker's extension (``extra_body`` in the SDKs): a Standard Webhooks
    #: event ``batch.<status>`` when the batch ends.
    webhook_url: str | None = None


_BATCH_REQUEST = msgspec.json.Decoder(BatchRequest)


def _store(state: State) -> BatchStore:
    return BatchStore(state.redis, state.config.redis.key_prefix, state.config.files.retention_s)


async def _spec(
    state: State,
    principal: Principal,
    *,
    api: str,
    endpoint: str,
    input_file_id: str,
    metadata: dict[str, str] | None,
    webhook_url: str | None = None,
) -> Batch:
    if webhook_url is not None:
        await check_webhook(state, principal.tenant, webhook_url)
    now = int(time.time())
    spec = Spec(
        id=new_batch_id("openai" if api == "openai" else "anthropic"),
        tenant=principal.tenant,
        api="openai" if api == "openai" else "anthropic",
        key_id=principal.key_id,
        endpoint=endpoint,
        input_file_id=input_file_id,
        metadata=metadata,
        created_at=now,
        expires_at=now + int(state.config.files.completion_window_s),
        webhook_url=webhook_url,
    )
    try:
        return await redis_call(
            state,
            "batches",
            "",
            _store(state).create(spec, state.config.files.max_batches_in_progress),
        )
    except TooManyBatches as e:
        raise QueueFull(str(e), code="too_many_batches", headers={"Retry-After": "60"}) from e


# ------------------------------------------------------------------ OpenAI


async def create_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = await identify(request, state)
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    body = decode_body(_BATCH_REQUEST, raw, "batch", required=("input_file_id", "endpoint"))
    if body.endpoint not in ENDPOINTS:
        raise BadRequest(
            f"endpoint must be one of {', '.join(ENDPOINTS)}; got {body.endpoint[:64]!r}",
            param="endpoint",
        )
    if body.completion_window != "24h":
        raise BadRequest("completion_window must be '24h'", param="completion_window")
    if body.metadata is not None and (
        len(body.metadata) > 16
        or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())
    ):
        raise BadRequest(
            "metadata holds at most 16 keys of up to 64 characters, values up to 512",
            param="metadata",
        )
    rec = await redis_call(
        state, "files", "", state.files.get(principal.tenant, body.input_file_id)
    )
    if rec is None:
        raise BadRequest(
            f"no file with id {body.input_file_id!r}", param="input_file_id", code="invalid_file"
        )
    if rec.purpose != "batch":
        raise BadRequest(
            f"the file {rec.id!r} has purpose {rec.purpose!r}, not 'batch'",
            param="input_file_id",
            code="invalid_file",
        )
    batch = await _spec(
        state,
        principal,
        api="openai",
        endpoint=body.endpoint,
        input_file_id=rec.id,
        metadata=body.metadata,
        webhook_url=body.webhook_url,
    )
    return json_response(openai_object(batch))


async def _owned(request: web.Request, state: State, api: str) -> Batch:
    principal = await identify(request, state)
    batch_id = request.match_info["batch_id"]
    batch = await redis_call(state, "batches", "", _store(state).get(batch_id, principal.tenant))
    if batch is None or batch.spec.api != api:
        raise NotFound(f"no batch with id {batch_id!r}", code="batch_not_found")
    return batch


async def get_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(openai_object(await _owned(request, state, "openai")))


async def cancel_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    batch = await _owned(request, state, "openai")
    found = await redis_call(
        state, "batches", "", _store(state).cancel(batch.spec.id, batch.spec.tenant)
    )
    return json_response(openai_object(found or batch))


async def list_batches(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = await identify(request, state)
    limit = limit_query(request, 20, 100)
    found, more = await redis_call(
        state,
        "batches",
        "",
        _store(state).page(principal.tenant, "openai", request.query.get("after"), limit),
    )
    data = [openai_object(b) for b in found]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


# ------------------------------------------------------------------ Anthropic


def anthropic_object(request: web.Request, b: Batch) -> dict[str, Any]:
    # results_url as the client reached the broker (a TLS proxy in front says so).
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return batches.anthropic_object(b, f"{scheme}://{host}")


def _anthropic_requests(raw: bytes, max_lines: int) -> tuple[list[bytes], str | None]:
    """The body's requests as input lines ({"custom_id", "params"}), checked, and
    its ``webhook_url`` (the broker's extension)."""
    body = load_json(raw)
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise BadRequest("requests: expected a list of {custom_id, params}", param="requests")
    requests: list[Any] = body["requests"]
    top = min(MAX_REQUESTS, max_lines)
    if not 1 <= len(requests) <= top:
        raise BadRequest(f"requests holds 1 to {top} requests", param="requests")
    seen: set[str] = set()
    lines = []
    for i, item in enumerate(requests):
        where = f"requests.{i}"
        if not isinstance(item, dict) or not isinstance(item.get("params"), dict):
            raise BadRequest(f"{where}: expected {{custom_id, params}}", param=where)
        cid = item.get("custom_id")
        if not isinstance(cid, str) or not 1 <= len(cid) <= 64:
            raise BadRequest(f"{where}.custom_id: 1 to 64 characters", param=f"{where}.custom_id")
        if cid in seen:
            raise BadRequest(f"{where}.custom_id {cid!r} is used twice", param=f"{where}.custom_id")
        seen.add(cid)
        if item["params"].get("stream") is not None and item["params"]["stream"] is not False:
            raise BadRequest(
                f"{where}.params.stream: a batch's requests do not stream", param=f"{where}.params"
            )
        params = orjson.dumps(item["params"])
        try:
            decode_messages(params)  # run as it is on an Anthropic deployment
        except BadRequest as e:
            field = f"{where}.params" + (f".{e.param}" if e.param else "")
            raise BadRequest(f"{where}.params: {e.message}", param=field) from e
        lines.append(orjson.dumps({"custom_id": cid, "params": orjson.Fragment(params)}))
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and not isinstance(webhook_url, str):
        raise BadRequest("webhook_url must be a string", param="webhook_url")
    extra = set(body) - {"requests", "webhook_url"}
    if extra:
        raise BadRequest(f"unknown field {sorted(extra)[0]!r}", param=sorted(extra)[0])
    return lines, webhook_url


async def create_message_batch(request: web.Request) -> web.Response:
    request[CONTEXT].api = "anthropic"
    state = request.app[STATE]
    principal = await identify(request, state)
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    lines, webhook_url = _anthropic_requests(raw, state.config.files.max_lines)
    data = b"".join(line + b"\n" for line in lines)

    async def chunks() -> Any:
        yield data

    rec = FileRecord(
        id=new_file_id(),
        tenant=principal.tenant,
        purpose="batch",
        filename="message_batch_requests.jsonl",
        bytes=len(data),
        created_at=int(time.time()),
    )
    try:
        await state.files.store.write(f"files/{rec.id}", chunks(), state.config.files.max_bytes)
    except TooLarge as e:
        raise BadRequest(str(e), param="requests") from e
    await redis_call(state, "files", "", state.files.save(rec))
    batch = await _spec(
        state,
        principal,
        api="anthropic",
        endpoint=MESSAGES,
        input_file_id=rec.id,
        metadata=None,
        webhook_url=webhook_url,
    )
    # Its requests are known now: all are processing until the driver counts them.
    await redis_call(state, "batches", "", _store(state).set_total(batch.spec.id, len(lines)))
    batch.total = len(lines)
    return json_response(anthropic_object(request, batch))


async def get_message_batch(request: web.Request) -> web.Response:
    request[CONTEXT].api = "anthropic"
    state = request.app[STATE]
    return json_response(anthropic_object(request, await _owned(request, state, "anthropic")))


async def cancel_message_batch(request: web.Request) -> web.Response:
    request[CONTEXT].api = "anthropic"
    state = request.app[STATE]
    batch = await _owned(request, state, "anthropic")
    found = await redis_call(
        state, "batches", "", _store(state).cancel(batch.spec.id, batch.spec.tenant)
    )
    return json_response(anthropic_object(request, found or batch))


async def list_message_batches(request: web.Request) -> web.Response:
    request[CONTEXT].api = "anthropic"
    state = request.app[STATE]
    principal = await identify(request, state)
    limit = limit_query(request, 20, 1000)
    found, more = await redis_call(
        state,
        "batches",
        "",
        _store(state).page(principal.tenant, "anthropic", request.query.get("after_id"), limit),
    )
    data = [anthropic_object(request, b) for b in found]
    return json_response(
        {
            "data": data,
            "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


async def message_batch_results(request: web.Request) -> web.StreamResponse:
    request[CONTEXT].api = "anthropic"
    state = request.app[STATE]
    batch = await _owned(request, state, "anthropic")
    if batch.status not in FINAL:
        raise BadRequest(f"the batch {batch.spec.id} has not ended yet; its results come then")
    response = web.StreamResponse(headers={"Content-Type": "application/binary"})
    await response.prepare(request)
    if batch.output_file_id is not None:
        rec = await redis_call(
            state, "files", "", state.files.get(batch.spec.tenant, batch.output_file_id)
        )
        if rec is not None:
            async for chunk in state.files.content(rec):
                await response.write(chunk)
    await response.write_eof()
    return response


async def delete_message_batch(request: web.Request) -> web.Response:
    request[CONTEXT].api = "anthropic"
    state = request.app[STATE]
    batch = await _owned(request, state, "anthropic")
    if batch.status not in FINAL:
        raise BadRequest(
            f"the batch {batch.spec.id} is still processing; cancel it and wait for it to end"
        )
    for file_id in (batch.spec.input_file_id, batch.output_file_id):
        if file_id is not None:
            rec = await redis_call(state, "files", "", state.files.get(batch.spec.tenant, file_id))
            if rec is not None:
                await redis_call(state, "files", "", state.files.delete(rec))
    await redis_call(state, "batches", "", _store(state).delete(batch))
    return json_response({"id": batch.spec.id, "type": "message_batch_deleted"})


#: The API's paths (see :func:`add_routes`).
PATHS = (
    "/v1/batches",
    "/v1/batches/{batch_id}",
    "/v1/batches/{batch_id}/cancel",
    "/v1/messages/batches",
    "/v1/messages/batches/{batch_id}",
    "/v1/messages/batches/{batch_id}/cancel",
    "/v1/messages/batches/{batch_id}/results",
)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/batches", create_batch)
    r.add_get("/v1/batches", list_batches)
    r.add_get("/v1/batches/{batch_id}", get_batch)
    r.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    r.add_post("/v1/messages/batches", create_message_batch)
    r.add_get("/v1/messages/batches", list_message_batches)
    r.add_get("/v1/messages/batches/{batch_id}", get_message_batch)
    r.add_post("/v1/messages/batches/{batch_id}/cancel", cancel_message_batch)
    r.add_get("/v1/messages/batches/{batch_id}/results", message_batch_results)
    r.add_delete("/v1/messages/batches/{batch_id}", delete_message_batch)

"""The OpenAI Responses API: ``POST /v1/responses``, ``GET /v1/responses/{id}``,
``POST /v1/responses/{id}/cancel``, ``GET /v1/responses/{id}/input_items``.

A response is a job of kind ``responses``; its id is ``resp_<job id>``. A worker
sends the request as it is to an OpenAI or Azure deployment, and translates it
through chat for any other (``workers/native.py``); the answer, or the stream of
Responses events, reaches the client in the Responses API either way.

State is the broker's, kept with the job: a stored response (``store``, true by
default) keeps its request (without its input) and its input items under
``resp:<job id>`` for as long as the job's record lives (``jobs.result_ttl_s``).
``previous_response_id`` names such a response: its input and output items come
before the new input, on any deployment. ``background: true`` makes the response an
async job of the broker's: the answer is the response ``queued``, and ``GET``
follows it to ``completed`` (or ``failed``, ``cancelled``); ``cancel`` stops it.
A background response cannot also stream (poll it instead).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from llm_broker.ingress import calls
from llm_broker.ingress.admission import identify, new_job, redis_call
from llm_broker.ingress.bodies import decode_responses, json_response, load_json, read_json_body
from llm_broker.ingress.jobs import admit_async, owned_record
from llm_broker.ingress.state import STATE, State
from llm_broker.shared import messages as m
from llm_broker.shared import responses
from llm_broker.shared.errors import BadRequest, NotFound
from llm_broker.shared.store.records import JobRecord

_PREFIX = "resp_"


class ResponsesRenderer(calls.Renderer):
    """A response's stream has no ``[DONE]``; an error during it is an ``error`` event."""

    def end(self, data: bytes) -> bytes:
        return data

    def stream_error(self, data: bytes) -> bytes:
        try:
            found: Any = orjson.loads(data)["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            found = {"message": data.decode(errors="replace")}
        event = {
            "type": "error",
            "code": found.get("code") or found.get("type"),
            "message": found.get("message", ""),
            "param": found.get("param"),
            "sequence_number": 0,
        }
        return responses.sse_event("error", event)


RESPONSES = ResponsesRenderer()


async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    principal = await identify(request, state)
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    head = decode_responses(raw)
    if head.background and head.stream:
        raise BadRequest(
            "a background response does not stream here: poll GET /v1/responses/{id}",
            param="stream",
        )
    body = load_json(raw)
    context = b""
    if head.previous_response_id is not None:
        context = await _context(state, principal.tenant, head.previous_response_id)
    store = head.store is not False

    async def keep(job: m.Job) -> None:
        """Store the request and its input items, before the job is queued."""
        if not store:
            return
        job.result_ttl = int(state.config.jobs.result_ttl_s)
        kept = {k: v for k, v in body.items() if k != "input"}
        items = [*(orjson.loads(context) if context else ()), *responses.input_items(body)]
        value = orjson.dumps({"request": kept, "input": items})
        ttl = int(job.deadline - job.created) + job.result_ttl
        set_state = state.batcher.call("SET", state.keys.response(job.id), value, "EX", ttl)
        await redis_call(state, "responses", job.provider, set_state)

    if head.background:
        job_id, rec, _ = await admit_async(
            request,
            state,
            principal,
            raw,
            raw,
            webhook_url=None,
            metadata=None,
            kind=m.RESPONSES,
            context=context,
            before=keep,
        )
        return json_response(_shell(job_id, rec, body))
    job, route = await new_job(
        request,
        state,
        principal,
        raw,
        reply_to=state.replies.reply_to,
        kind=m.RESPONSES,
        context=context,
    )
    await keep(job)
    return await calls.run(request, state, job, route, RESPONSES)


def _job_id(response_id: str) -> str:
    if not response_id.startswith(_PREFIX):
        return ""
    return response_id[len(_PREFIX) :]


async def _stored(state: State, tenant: str, response_id: str) -> tuple[JobRecord, dict[str, Any]]:
    """A stored response of the caller's: its job's record and its kept request."""
    job_id = _job_id(response_id)
    if job_id:
        rec = await owned_record(state, tenant, job_id)
        kept = await redis_call(
            state, "responses", "", state.batcher.call("GET", state.keys.response(job_id))
        )
        if kept is not None:
            return rec, orjson.loads(kept)
    raise NotFound(f"no response with id {response_id!r}", code="response_not_found")


async def _context(state: State, tenant: str, response_id: str) -> bytes:
    """The items of a stored response's turns (its input, then its output), for a
    request that continues it."""
    try:
        rec, kept = await _stored(state, tenant, response_id)
    except NotFound as e:
        raise BadRequest(
            f"previous_response_id: no stored response with id {response_id!r}",
            param="previous_response_id",
            code="previous_response_not_found",
        ) from e
    if rec.status != m.COMPLETED or rec.result is None:
        raise BadRequest(
            f"previous_response_id: the response {response_id!r} is {rec.status}, not completed",
            param="previous_response_id",
        )
    output = orjson.loads(rec.result).get("output") or []
    return orjson.dumps([*kept["input"], *output])


def _shell(job_id: str, rec: JobRecord, request: dict[str, Any]) -> dict[str, Any]:
    """The response object of a job that has no answer (yet)."""
    status = {
        m.QUEUED: "queued",
        m.IN_PROGRESS: "in_progress",
        m.CANCELLED: "cancelled",
    }.get(rec.status, "failed")
    error = None
    if status == "failed":
        found: Any = orjson.loads(rec.error or m.DEADLINE_ERROR).get("error") or {}
        error = responses.failure_error(rec.http_status or 504, str(found.get("message", "")))
    return responses.response_shell(
        response_id=_PREFIX + job_id,
        model=rec.model,
        created_at=int(rec.created_at),
        request=request,
        status=status,
        error=error,
    )


def _render(job_id: str, rec: JobRecord, kept: dict[str, Any]) -> web.Response:
    if rec.status == m.COMPLETED and rec.result is not None:
        return web.Response(body=rec.result, content_type="application/json")
    return json_response(_shell(job_id, rec, kept["request"]))


async def get_response(request: web.Request) -> web.Response:
    state = request.app[STATE]
    tenant = (await identify(request, state)).tenant
    if request.query.get("stream") not in (None, "false"):
        raise BadRequest(
            "streaming a stored response is not supported: GET it without stream",
            param="stream",
        )
    response_id = request.match_info["response_id"]
    rec, kept = await _stored(state, tenant, response_id)
    return _render(_job_id(response_id), rec, kept)


async def cancel_response(request: web.Request) -> web.Response:
    """Cancel a background response that is not final; a final one is returned as it is."""
    state = request.app[STATE]
    tenant = (await identify(request, state)).tenant
    response_id = request.match_info["response_id"]
    rec, kept = await _stored(state, tenant, response_id)
    if not kept["request"].get("background"):
        raise BadRequest("only a background response can be cancelled", param="response_id")
    job_id = _job_id(response_id)
    cancel = state.store.cancel(job_id, tenant, result_ttl=int(state.config.jobs.result_ttl_s))
    found = await redis_call(state, "jobs", "", cancel)
    return _render(job_id, found.record if found is not None else rec, kept)


async def input_items(request: web.Request) -> web.Response:
    """A stored response's input items (the earlier turns' included), oldest first."""
    state = request.app[STATE]
    tenant = (await identify(request, state)).tenant
    response_id = request.match_info["response_id"]
    _, kept = await _stored(state, tenant, response_id)
    items = [{**item, "id": item.get("id") or f"item_{i}"} for i, item in enumerate(kept["input"])]
    return json_response(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", input_items)

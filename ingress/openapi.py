"""The OpenAPI 3.1 description of the ingress, served at ``GET /openapi.json``.

The request schemas are generated (``msgspec.json.schema_components``) from the
structs the ingress decodes with (:mod:`llm_broker.shared.messages`) and the error object
from :mod:`llm_broker.shared.errors`. The structs below exist only to document what is
built as plain dicts: the answers, and the Anthropic request (``/v1/messages``
decodes a dict and checks it in :func:`shared.anthropic.messages_to_chat`).
The document is built once, when the app is created.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from llm_broker.shared import messages as m
from llm_broker.shared.config import PRIORITIES, Priority
from llm_broker.shared.errors import ErrorObject

# ---------------------------------------------------------------- answers (documentation only)


class FunctionCall(msgspec.Struct):
    name: str
    #: The arguments as a JSON text.
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    type: str
    function: FunctionCall


class AssistantMessage(msgspec.Struct):
    role: str
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ChatCompletion(msgspec.Struct):
    """The answer of a chat call, as the upstream sent it (unknown fields kept)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Embedding(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    #: Floats, or base64 with ``encoding_format: "base64"``.
    embedding: list[float] | str


class EmbeddingList(msgspec.Struct):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage | None = None


class Model(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[Model]


class JobWebhook(msgspec.Struct):
    url: str
    status: Literal["pending", "delivered", "failed", "disabled"]
    attempts: int
    last_status_code: int | None
    last_attempt_at: int | None
    last_error: str | None


JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled", "expired"]


class Job(msgspec.Struct):
    """An async job (``POST /v1/jobs``, or a chat call with ``Prefer: respond-async``)."""

    id: str
    object: Literal["job"]
    status: JobStatus
    model: str | None
    created_at: int | None
    started_at: int | None
    completed_at: int | None
    attempts: int
    #: Deployments tried, when there was more than one try.
    history: list[m.Attempt]
    metadata: dict[str, str]
    #: Its priority class (None for a job admitted before classes existed).
    priority: Priority | None
    result: ChatCompletion | None
    error: ErrorObject | None
    webhook: JobWebhook | None


class JobList(msgspec.Struct):
    object: Literal["list"]
    data: list[Job]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Status(msgspec.Struct, omit_defaults=True):
    status: str
    detail: str | None = None


# ---------------------------------------------------------------- Anthropic Messages API


class TextParam(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class Base64Source(msgspec.Struct, tag_field="type", tag="base64"):
    media_type: str
    data: str


class UrlSource(msgspec.Struct, tag_field="type", tag="url"):
    url: str


class ImageParam(msgspec.Struct, tag_field="type", tag="image"):
    source: Base64Source | UrlSource


class ToolUseParam(msgspec.Struct, tag_field="type", tag="tool_use"):
    """In assistant turns only."""

    id: str
    name: str
    input: dict[str, Any]


class ToolResultParam(msgspec.Struct, tag_field="type", tag="tool_result"):
    """In user turns only."""

    tool_use_id: str
    content: str | list[TextParam | ImageParam] | None = None
    is_error: bool | None = None


class AnthropicMessageParam(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: (
        str
        | Annotated[
            list[TextParam | ImageParam | ToolUseParam | ToolResultParam],
            msgspec.Meta(min_length=1),
        ]
    )


class AnthropicTool(msgspec.Struct):
    name: str
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None


class ToolChoiceAuto(msgspec.Struct, tag_field="type", tag="auto"):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(msgspec.Struct, tag_field="type", tag="any"):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(msgspec.Struct, tag_field="type", tag="none"):
    pass


class ToolChoiceTool(msgspec.Struct, tag_field="type", tag="tool"):
    name: str
    disable_parallel_tool_use: bool | None = None


class AnthropicRequest(msgspec.Struct):
    """The fields of an Anthropic Messages request that the broker translates."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    messages: Annotated[list[AnthropicMessageParam], msgspec.Meta(min_length=1)]
    system: str | list[TextParam] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoiceAuto | ToolChoiceAny | ToolChoiceNone | ToolChoiceTool | None = None
    metadata: dict[str, Any] | None = None


class TextBlock(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0


class AnthropicMessage(msgspec.Struct):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicError(msgspec.Struct):
    type: Literal["error"]
    error: AnthropicErrorDetail


_TYPES: tuple[Any, ...] = (
    m.ChatRequest,
    m.EmbeddingsRequest,
    m.JobSubmission,
    AnthropicRequest,
    ErrorObject,
    AnthropicError,
    ChatCompletion,
    EmbeddingList,
    ModelList,
    Job,
    JobList,
    Status,
    AnthropicMessage,
)

#: Bodies whose unknown fields travel upstream untouched.
_PASSED_THROUGH = ("ChatRequest", "ChatMessage", "EmbeddingsRequest", "AnthropicRequest")
#: Structs encoded with every field present although some have defaults.
_ALL_FIELDS_WRITTEN = ("ErrorBody", "Job", "JobWebhook")


def _schemas() -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(_TYPES, ref_template="#/components/schemas/{name}")
    for name in _PASSED_THROUGH:
        schemas[name]["additionalProperties"] = True
    for name in _ALL_FIELDS_WRITTEN:
        schemas[name]["required"] = list(schemas[name]["properties"])
    # What ingress checks beyond the types (ingress/bodies.py decode_chat, decode_embeddings).
    schemas["ChatRequest"]["properties"]["messages"]["minItems"] = 1
    for option in schemas["EmbeddingsRequest"]["properties"]["input"]["anyOf"]:
        option["minLength" if option["type"] == "string" else "minItems"] = 1
    # Decoded as raw JSON, then validated as a chat request.
    schemas["JobSubmission"]["properties"]["request"] = _ref("ChatRequest")
    # Checked by ingress (admission.py), not by the decoder: its error names the field.
    schemas["JobSubmission"]["properties"]["priority"] = {
        "anyOf": [{"enum": list(PRIORITIES)}, {"type": "null"}],
        "description": "The job's priority class, lowered to the tenant's max_priority.",
    }
    return dict(schemas)


def _ref(name: str, kind: str = "schemas") -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema)}}


#: Under OpenAPI 3.1 the schema of an event stream describes each event.
_STREAM = {
    "text/event-stream": {
        "schema": {
            "description": "One server-sent event. OpenAI: `data` is a chat.completion.chunk "
            "(JSON), then `[DONE]`; Anthropic: `event` names the event and `data` is its JSON.",
            "type": "object",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
            "required": ["data"],
        }
    }
}

_ERRORS = {
    400: "The request is malformed or invalid.",
    401: "No API key, or an unknown one.",
    404: "No such model (or job).",
    413: "The body exceeds `ingress.max_body_bytes`.",
    415: "The body is not `application/json`.",
    422: "The `Idempotency-Key` was used with a different request.",
    429: "The provider's queue is full (see `Retry-After`).",
    502: "The upstream failed or could not be reached.",
    503: "The queue (Redis) is unavailable, or every deployment's circuit is open.",
    504: "No answer within the request deadline.",
}


def _errors(statuses: tuple[int, ...], schema: str = "ErrorObject") -> dict[str, Any]:
    return {str(s): {"description": _ERRORS[s], "content": _json(schema)} for s in statuses}


_CALL_ERRORS = (400, 401, 404, 413, 415, 429, 502, 503, 504)
_JOB_ERRORS = (401, 404, 503)
_ACCEPTED = {
    "description": "Queued as an async job; poll `Location`.",
    "headers": {
        "Location": {"required": True, "schema": {"type": "string"}},
        "X-Request-Id": {"required": True, "schema": {"type": "string"}},
        "Retry-After": {"schema": {"type": "string"}},
    },
    "content": _json("Job"),
}

_PARAMETERS: dict[str, Any] = {
    "Prefer": {
        "name": "Prefer",
        "in": "header",
        "description": "`respond-async` (RFC 7240): queue the call as a job and answer 202.",
        "schema": {"type": "string", "examples": ["respond-async"]},
    },
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "description": "Submitting the same request with the same key again returns "
        "the first job (`Idempotent-Replayed: true`); another request with it is a 422.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    },
    "RequestTimeout": {
        "name": "X-Request-Timeout",
        "in": "header",
        "description": "The request deadline in seconds, a plain decimal number in "
        "(0, `ingress.max_request_timeout_s`]; default `ingress.request_timeout_s`.",
        "schema": {"type": "string", "pattern": "^[0-9]{1,4}(\\.[0-9]{1,3})?$"},
    },
    "Traceparent": {
        "name": "traceparent",
        "in": "header",
        "description": "W3C trace context, continued by the broker's spans and the upstream call.",
        "schema": {
            "type": "string",
            "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        },
    },
    "Priority": {
        "name": "X-Priority",
        "in": "header",
        "description": "The request's priority class (default `interactive` for calls, `async` "
        "for jobs), lowered to the tenant's `max_priority`.",
        "schema": {"enum": list(PRIORITIES)},
    },
    "JobId": {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}},
}


def _params(*names: str) -> list[dict[str, str]]:
    return [_ref(n, "parameters") for n in names]


def _call(
    summary: str, body: str, answer: dict[str, Any], errors: dict[str, Any], *params: str
) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": _params(*params, "Priority", "RequestTimeout", "Traceparent"),
        "requestBody": {"required": True, "content": _json(body)},
        "responses": {"200": answer, **errors},
    }


def _public(summary: str, content: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [],
        "responses": {"200": {"description": "OK", "content": content}, **more},
    }


def _paths() -> dict[str, Any]:
    chat = _call(
        "Create a chat completion (OpenAI); SSE with `stream: true`.",
        "ChatRequest",
        {"description": "The completion.", "content": {**_json("ChatCompletion"), **_STREAM}},
        _errors((*_CALL_ERRORS, 422)),
        "Prefer",
        "IdempotencyKey",
    )
    chat["responses"]["202"] = _ACCEPTED
    list_params = [
        {"name": "status", "in": "query", "schema": {"enum": list(m.STATUSES)}},
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
        },
        {"name": "after", "in": "query", "schema": {"type": "string"}},
    ]
    job_answer = {"description": "The job.", "content": _json("Job")}
    return {
        "/v1/chat/completions": {"post": chat},
        "/v1/embeddings": {
            "post": _call(
                "Create embeddings (OpenAI).",
                "EmbeddingsRequest",
                {"description": "The embeddings.", "content": _json("EmbeddingList")},
                _errors(_CALL_ERRORS),
            )
        },
        "/v1/messages": {
            "post": _call(
                "Create a message (Anthropic); SSE with `stream: true`. "
                "Errors come in Anthropic's shape.",
                "AnthropicRequest",
                {
                    "description": "The message.",
                    "content": {**_json("AnthropicMessage"), **_STREAM},
                },
                _errors(_CALL_ERRORS, "AnthropicError"),
            )
        },
        "/v1/models": {
            "get": {
                "summary": "The routed model names.",
                "responses": {
                    "200": {"description": "The models.", "content": _json("ModelList")},
                    **_errors((401,)),
                },
            }
        },
        "/v1/jobs": {
            "post": {
                "summary": "Queue a chat request as an async job, optionally with a webhook.",
                "parameters": _params(
                    "IdempotencyKey", "Priority", "RequestTimeout", "Traceparent"
                ),
                "requestBody": {"required": True, "content": _json("JobSubmission")},
                "responses": {
                    "202": _ACCEPTED,
                    **_errors((400, 401, 404, 413, 415, 422, 429, 503)),
                },
            },
            "get": {
                "summary": "The caller's async jobs, newest first.",
                "parameters": list_params,
                "responses": {
                    "200": {"description": "A page of jobs.", "content": _json("JobList")},
                    **_errors((400, 401, 503)),
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "A job: status, result or error, webhook state.",
                "parameters": _params("JobId"),
                "responses": {"200": job_answer, **_errors(_JOB_ERRORS)},
            }
        },
        "/v1/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a job that has not finished; a finished one is returned as is.",
                "parameters": _params("JobId"),
                "responses": {"200": job_answer, **_errors(_JOB_ERRORS)},
            }
        },
        "/health": {"get": _public("Liveness.", _json("Status"))},
        "/ready": {
            "get": _public(
                "Readiness: Redis reachable and not draining.",
                _json("Status"),
                **{"503": {"description": "Not ready.", "content": _json("Status")}},
            )
        },
        "/metrics": {
            "get": _public("Prometheus metrics.", {"text/plain": {"schema": {"type": "string"}}})
        },
        "/openapi.json": {"get": _public("This document.", {"application/json": {"schema": {}}})},
    }


def document(*, metrics: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every public route (``/metrics`` only when the
    API port serves it, i.e. without ``ingress.metrics_port``)."""
    paths = _paths()
    if not metrics:
        del paths["/metrics"]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-broker",
            "version": metadata.version("llm-broker"),
            "description": "A queue-based LLM gateway speaking the OpenAI and Anthropic APIs.",
        },
        "security": [{"bearerAuth": []}, {"apiKeyAuth": []}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "parameters": _PARAMETERS,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


def handler(*, metrics: bool = True) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler serving the document, encoded once now."""
    body = msgspec.json.encode(document(metrics=metrics))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return openapi_json

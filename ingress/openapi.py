"""The OpenAPI 3.1 description of the ingress, served at ``GET /openapi.json``.

The request schemas are generated (``msgspec.json.schema_components``) from the
structs the ingress decodes with (:mod:`llm_broker.shared.messages`,
:mod:`llm_broker.shared.accounts` for the admin API, ``BatchRequest`` of
:mod:`llm_broker.ingress.batches`) and the error object from
:mod:`llm_broker.shared.errors`. The structs below exist only to document what is
built as plain dicts: the answers, the Anthropic request (``/v1/messages``
decodes a dict and checks it in :func:`shared.anthropic.messages_to_chat`) and
the message batch request, and the lines of a batch's results.
The document is built once, when the app is created.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import metadata
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from llm_broker.ingress.batches import BatchRequest
from llm_broker.shared import accounts as a
from llm_broker.shared import messages as m
from llm_broker.shared.batches import ENDPOINTS
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
    """An async job (``POST /v1/jobs``, a chat or Messages call with ``Prefer:
    respond-async``, or a background response); ``result`` is the answer in the API
    the request came in."""

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


class FileObject(msgspec.Struct):
    """A file of the Files API."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    #: When the file is deleted (Unix seconds, ``files.retention_s`` after its upload).
    expires_at: int | None
    filename: str
    purpose: str
    status: Literal["processed"]
    status_details: str | None


class FileList(msgspec.Struct):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(msgspec.Struct):
    id: str
    object: Literal["file"]
    deleted: Literal[True]


class Status(msgspec.Struct, omit_defaults=True):
    status: str
    detail: str | None = None


# ---------------------------------------------------------------- Anthropic Messages API


class Ephemeral(msgspec.Struct, tag_field="type", tag="ephemeral"):
    """Prompt caching's breakpoint on a block (Anthropic deployments; dropped in
    translation)."""

    ttl: Literal["5m", "1h"] | None = None


CacheControl = Ephemeral | None


class TextParam(msgspec.Struct, tag_field="type", tag="text"):
    text: str
    cache_control: CacheControl = None


class Base64Source(msgspec.Struct, tag_field="type", tag="base64"):
    media_type: str
    data: str


class UrlSource(msgspec.Struct, tag_field="type", tag="url"):
    url: str


class ImageParam(msgspec.Struct, tag_field="type", tag="image"):
    source: Base64Source | UrlSource
    cache_control: CacheControl = None


class TextSource(msgspec.Struct, tag_field="type", tag="text"):
    media_type: Literal["text/plain"]
    data: str


class Citations(msgspec.Struct):
    enabled: bool


class DocumentParam(msgspec.Struct, tag_field="type", tag="document"):
    """A PDF (base64 or URL) or text document: Anthropic deployments only."""

    source: Base64Source | UrlSource | TextSource
    title: str | None = None
    context: str | None = None
    citations: Citations | None = None
    cache_control: CacheControl = None


class ThinkingParam(msgspec.Struct, tag_field="type", tag="thinking"):
    """An earlier assistant turn's thinking: Anthropic deployments only."""

    thinking: str
    signature: str


class RedactedThinkingParam(msgspec.Struct, tag_field="type", tag="redacted_thinking"):
    data: str


class ToolUseParam(msgspec.Struct, tag_field="type", tag="tool_use"):
    """In assistant turns only."""

    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl = None


class ToolResultParam(msgspec.Struct, tag_field="type", tag="tool_result"):
    """In user turns only."""

    tool_use_id: str
    content: str | list[TextParam | ImageParam] | None = None
    is_error: bool | None = None
    cache_control: CacheControl = None


class AnthropicMessageParam(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: (
        str
        | Annotated[
            list[
                TextParam
                | ImageParam
                | DocumentParam
                | ThinkingParam
                | RedactedThinkingParam
                | ToolUseParam
                | ToolResultParam
            ],
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


class ThinkingEnabled(msgspec.Struct, tag_field="type", tag="enabled"):
    budget_tokens: Annotated[int, msgspec.Meta(ge=1024)]


class ThinkingDisabled(msgspec.Struct, tag_field="type", tag="disabled"):
    pass


class AnthropicRequest(msgspec.Struct):
    """An Anthropic Messages request: sent as it came to an Anthropic deployment (its
    other fields too), translated for any other (a field that cannot be translated is
    a 400 naming it)."""

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
    #: Extended thinking: Anthropic only.
    thinking: ThinkingEnabled | ThinkingDisabled | None = None


class CountTokensRequest(msgspec.Struct):
    """``POST /v1/messages/count_tokens``: an Anthropic deployment counts."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[AnthropicMessageParam], msgspec.Meta(min_length=1)]
    system: str | list[TextParam] | None = None
    tools: list[AnthropicTool] | None = None


class TokenCount(msgspec.Struct):
    input_tokens: int


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


class ThinkingBlock(msgspec.Struct, tag_field="type", tag="thinking"):
    thinking: str
    signature: str


class RedactedThinkingBlock(msgspec.Struct, tag_field="type", tag="redacted_thinking"):
    data: str


class AnthropicMessage(msgspec.Struct):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextBlock | ToolUseBlock | ThinkingBlock | RedactedThinkingBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicError(msgspec.Struct):
    type: Literal["error"]
    error: AnthropicErrorDetail


# ---------------------------------------------------------------- Responses API


class ResponsesRequest(msgspec.Struct):
    """An OpenAI Responses request: sent as it came to an OpenAI or Azure deployment,
    translated through chat for any other (built-in tools cannot be: 400)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: (
        Annotated[str, msgspec.Meta(min_length=1)]
        | Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)]
    )
    instructions: str | None = None
    stream: bool | None = None
    #: Run as an async job of the broker's: answered ``queued``, polled with GET.
    background: bool | None = None
    store: bool | None = None
    #: A stored response of the caller's whose turns come before ``input``.
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    metadata: dict[str, str] | None = None


class ResponseObject(msgspec.Struct):
    """A response (OpenAI's object); ``output`` holds message and function_call items."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[dict[str, Any]]
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


class ResponseItemList(msgspec.Struct):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---------------------------------------------------------------- batches (documentation only)

BatchStatus = Literal[
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
]


class BatchError(msgspec.Struct):
    """Why a batch failed validation (``line``: the input line at fault, from 1)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct):
    object: Literal["list"]
    data: list[BatchError]


class BatchRequestCounts(msgspec.Struct):
    total: int
    completed: int
    #: Lines that failed, and lines that ended without running (the window ended,
    #: or the batch was cancelled while they were queued or running).
    failed: int


class OpenAIBatch(msgspec.Struct):
    """An OpenAI batch (``/v1/batches``). Times are Unix seconds."""

    id: str
    object: Literal["batch"]
    endpoint: Literal["/v1/chat/completions", "/v1/embeddings"]
    #: Set when the batch failed validation.
    errors: BatchErrors | None
    input_file_id: str
    completion_window: Literal["24h"]
    status: BatchStatus
    #: The successful lines' results (JSONL), once the batch is final.
    output_file_id: str | None
    #: The failed lines, and those never run, once the batch is final.
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class OpenAIBatchList(msgspec.Struct):
    object: Literal["list"]
    data: list[OpenAIBatch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchLineResponse(msgspec.Struct):
    status_code: int
    #: The line's job id.
    request_id: str
    #: The answer (``chat.completion``, embeddings list) or the error object.
    body: dict[str, Any] | None


class BatchLineError(msgspec.Struct):
    code: Literal["batch_expired", "batch_cancelled"]
    message: str


class BatchOutputLine(msgspec.Struct):
    """A line of a batch's output or error file (``GET /v1/files/{file_id}/content``)."""

    id: str
    custom_id: str
    #: Null for a line that never ran.
    response: BatchLineResponse | None
    error: BatchLineError | None


class MessageBatchRequest(msgspec.Struct):
    custom_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    params: AnthropicRequest


class MessageBatchCreate(msgspec.Struct, forbid_unknown_fields=True):
    requests: Annotated[list[MessageBatchRequest], msgspec.Meta(min_length=1, max_length=100_000)]


class MessageBatchRequestCounts(msgspec.Struct):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatch(msgspec.Struct):
    """An Anthropic message batch (``/v1/messages/batches``). Times are RFC 3339, UTC."""

    id: str
    type: Literal["message_batch"]
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: MessageBatchRequestCounts
    ended_at: datetime | None
    created_at: datetime
    expires_at: datetime
    archived_at: datetime | None
    cancel_initiated_at: datetime | None
    #: ``GET /v1/messages/batches/{batch_id}/results`` on this broker, once ended.
    results_url: str | None


class MessageBatchList(msgspec.Struct):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class MessageBatchDeleted(msgspec.Struct):
    id: str
    type: Literal["message_batch_deleted"]


class Succeeded(msgspec.Struct, tag_field="type", tag="succeeded"):
    message: AnthropicMessage


class Errored(msgspec.Struct, tag_field="type", tag="errored"):
    error: AnthropicError


class Canceled(msgspec.Struct, tag_field="type", tag="canceled"):
    pass


class Expired(msgspec.Struct, tag_field="type", tag="expired"):
    pass


class MessageBatchResult(msgspec.Struct):
    """A line of ``GET /v1/messages/batches/{batch_id}/results``."""

    custom_id: str
    result: Succeeded | Errored | Canceled | Expired


# ---------------------------------------------------------------- admin API (documentation only)


class Spend(msgspec.Struct):
    """What the budget's current period has spent, the requests still running
    counted at their estimate."""

    usd: float
    remaining_usd: float
    #: When the period ends (Unix seconds); null for a ``total`` budget.
    resets_at: float | None


class Tenant(msgspec.Struct, kw_only=True):
    """A tenant kept in Redis (``spend`` only with a budget)."""

    object: Literal["tenant"]
    name: str
    metadata: dict[str, str]
    limits: a.Limits
    budget: a.Budget | None
    created_at: float
    updated_at: float
    spend: Spend | msgspec.UnsetType = msgspec.UNSET


class TenantList(msgspec.Struct):
    object: Literal["list"]
    data: list[Tenant]


class TenantDeleted(msgspec.Struct):
    object: Literal["tenant"]
    name: str
    deleted: Literal[True]


class ApiKey(msgspec.Struct, kw_only=True):
    """An API key kept in Redis: never its secret, nor the secret's hash."""

    object: Literal["api_key"]
    id: str
    tenant: str
    name: str
    #: The first 12 characters of the current secret, to tell keys apart.
    hint: str
    status: Literal["active", "revoked", "expired"]
    created_at: float
    updated_at: float
    expires_at: float | None
    revoked_at: float | None
    models: list[str]
    max_priority: Priority | None
    limits: a.Limits
    budget: a.Budget | None
    admin: bool
    #: Until when the secret replaced by the last rotation stays valid.
    previous_secret_valid_until: float | None
    spend: Spend | msgspec.UnsetType = msgspec.UNSET


class NewApiKey(ApiKey, kw_only=True):
    """A key just created or rotated, with its secret: shown this once."""

    key: str


class ApiKeyList(msgspec.Struct):
    object: Literal["list"]
    data: list[ApiKey]


class AuditEvent(msgspec.Struct):
    """One change made through the admin API; never holds a key."""

    id: str
    object: Literal["audit_event"]
    at: float
    #: ``config:<name>`` for an admin key from the config, else the key's id.
    actor: str
    action: Literal[
        "tenant.create",
        "tenant.update",
        "tenant.delete",
        "key.create",
        "key.update",
        "key.revoke",
        "key.rotate",
    ]
    #: The tenant's name or the key's id.
    target: str
    detail: dict[str, Any]


class AuditList(msgspec.Struct):
    object: Literal["list"]
    data: list[AuditEvent]
    has_more: bool
    #: ``after`` for the next page.
    last_id: str | None


class UsageRow(msgspec.Struct, kw_only=True):
    """Usage summed over what ``group_by`` leaves out; ``key`` is empty for the
    keys of the config."""

    day: str | msgspec.UnsetType = msgspec.UNSET
    tenant: str | msgspec.UnsetType = msgspec.UNSET
    key: str | msgspec.UnsetType = msgspec.UNSET
    model: str | msgspec.UnsetType = msgspec.UNSET
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    #: Requests that ended other than ``completed``.
    errors: int


class UsageList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[UsageRow]
    from_: str = msgspec.field(name="from")
    to: str
    #: ``GET /v1/usage`` only, for a key with a budget.
    spend: Spend | msgspec.UnsetType = msgspec.UNSET


_TYPES: tuple[Any, ...] = (
    m.ChatRequest,
    m.EmbeddingsRequest,
    m.JobSubmission,
    AnthropicRequest,
    CountTokensRequest,
    TokenCount,
    ResponsesRequest,
    ResponseObject,
    ResponseItemList,
    ErrorObject,
    AnthropicError,
    ChatCompletion,
    EmbeddingList,
    ModelList,
    Job,
    JobList,
    Status,
    FileObject,
    FileList,
    FileDeleted,
    AnthropicMessage,
    BatchRequest,
    OpenAIBatch,
    OpenAIBatchList,
    BatchOutputLine,
    MessageBatchCreate,
    MessageBatch,
    MessageBatchList,
    MessageBatchDeleted,
    MessageBatchResult,
    a.TenantInput,
    a.TenantPatch,
    a.KeyInput,
    a.KeyPatch,
    a.Rotation,
    Tenant,
    TenantList,
    TenantDeleted,
    NewApiKey,
    ApiKeyList,
    AuditList,
    UsageList,
)

#: Bodies whose unknown fields travel upstream untouched.
_PASSED_THROUGH = (
    "ChatRequest",
    "ChatMessage",
    "EmbeddingsRequest",
    "AnthropicRequest",
    "CountTokensRequest",
    "ResponsesRequest",
    "ResponseObject",
)
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
    # The answer in the request's API: a chat completion, a message, or a response.
    schemas["Job"]["properties"]["result"] = {
        "anyOf": [
            _ref("ChatCompletion"),
            _ref("AnthropicMessage"),
            _ref("ResponseObject"),
            {"type": "null"},
        ]
    }
    # Decoded as raw JSON, then validated as a chat request.
    schemas["JobSubmission"]["properties"]["request"] = _ref("ChatRequest")
    # Checked by ingress (admission.py), not by the decoder: its error names the field.
    schemas["JobSubmission"]["properties"]["priority"] = {
        "anyOf": [{"enum": list(PRIORITIES)}, {"type": "null"}],
        "description": "The job's priority class, lowered to the tenant's max_priority.",
    }
    _admin_checks(schemas)
    _batch_checks(schemas)
    return dict(schemas)


#: The most keys (32) of a tenant's metadata, of up to 64 characters, values up to 512.
_METADATA = {
    "type": "object",
    "maxProperties": 32,
    "propertyNames": {"maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 512},
}
#: Model names or ``fnmatch`` patterns (``gpt-4o*``); empty: every model.
_MODELS = {
    "type": "array",
    "maxItems": 256,
    "items": {"type": "string", "minLength": 1, "maxLength": 256},
    "description": "Model names or patterns (`gpt-4o*`, `*`, `?`, `[...]`) the key may call; "
    "empty: every model. Any other model is a 403 `model_not_allowed`.",
}


def _admin_checks(schemas: dict[str, Any]) -> None:
    """What shared/accounts.py checks beyond the types, in the admin request schemas."""
    for name in ("rpm", "tpm", "max_in_flight", "max_queued"):
        schemas["Limits"]["properties"][name].update(minimum=0, maximum=2**40)
    schemas["Limits"]["properties"]["rpm"]["description"] = "Requests per 60 s (0: none)."
    schemas["Limits"]["properties"]["tpm"]["description"] = (
        "Tokens per 60 s, a request counted at its estimate, corrected to its real tokens "
        "when it finishes (0: none)."
    )
    schemas["Limits"]["properties"]["max_in_flight"]["description"] = (
        "Requests admitted and not finished, waiting or running (0: none)."
    )
    schemas["Limits"]["properties"]["max_queued"]["description"] = (
        "Requests waiting for a worker (0: none)."
    )
    schemas["Budget"]["properties"]["usd"].update(minimum=0, maximum=1e9)
    schemas["TenantInput"]["properties"]["name"].update(
        minLength=1,
        maxLength=128,
        pattern="^[^\\s{}]+$",
        description="1 to 128 printable characters, no spaces nor braces.",
    )
    for name in ("TenantInput", "TenantPatch"):
        schemas[name]["properties"]["metadata"] = {**_METADATA}
    for name in ("KeyInput", "KeyPatch"):
        schemas[name]["properties"]["models"] = {**_MODELS}
    key = schemas["KeyInput"]["properties"]
    key["tenant"]["description"] = "The key's tenant (it must exist); empty for an admin key."
    key["name"]["description"] = "A label (the first 200 characters are kept)."
    key["admin"]["description"] = (
        "An admin key: it may call /admin/v1 only (never the model API) and has no tenant."
    )
    key["expires_at"]["description"] = "Unix seconds; null: never."
    schemas["Rotation"]["properties"]["grace_s"] = {
        "anyOf": [{"type": "number", "minimum": 0, "maximum": 30 * 86400}, {"type": "null"}],
        "description": "How long the current secret stays valid beside the new one "
        "(seconds; null: `accounts.rotation_grace_s`, 86400).",
    }


def _batch_checks(schemas: dict[str, Any]) -> None:
    """What ingress/batches.py checks beyond the types, in the batch request schemas."""
    body = schemas["BatchRequest"]["properties"]
    body["input_file_id"]["description"] = "A file of the caller's with purpose `batch`."
    body["endpoint"] = {"enum": list(ENDPOINTS), "description": "The URL of every line."}
    body["completion_window"] = {"enum": ["24h"], "description": "Only `24h`."}
    body["metadata"] = {
        "anyOf": [
            {
                "type": "object",
                "maxProperties": 16,
                "propertyNames": {"maxLength": 64},
                "additionalProperties": {"type": "string", "maxLength": 512},
            },
            {"type": "null"},
        ],
        "description": "At most 16 keys of up to 64 characters, values up to 512.",
    }
    hook = (
        "A Standard Webhooks event `batch.<status>` when the batch ends (webhooks must be "
        "configured; the URL is checked as a job's `webhook_url` is): the broker's extension."
    )
    create = schemas["MessageBatchCreate"]
    if "webhook_url" in body:  # both APIs take it (ingress/batches.py)
        body["webhook_url"]["description"] = hook + " With the SDKs: `extra_body`."
        create["properties"]["webhook_url"] = {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "description": hook,
        }
    create["properties"]["requests"]["description"] = (
        "The requests, each `custom_id` unique in the batch."
    )
    params = schemas["MessageBatchRequest"]["properties"]["params"]
    params["description"] = (
        "A Messages request, checked as `POST /v1/messages` checks one; without `stream` "
        "(a request with `stream: true` ends `errored`)."
    )


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
    403: "The API key may not use this model (`model_not_allowed`), or it is an admin key, "
    "which may call the admin API only (`admin_key`).",
    404: "No such model (or job).",
    413: "The body exceeds `ingress.max_body_bytes`.",
    415: "The body is not `application/json`.",
    409: "On a Redis Cluster: another request with the `Idempotency-Key` is being admitted "
    "(`idempotency_key_in_use`, with `Retry-After`).",
    422: "The `Idempotency-Key` was used with a different request.",
    429: "Refused at admission (`Retry-After` says when to try again): the provider's queue is "
    "full (`queue_full`); a tenant quota of the config (`tenant_queue_full`, "
    "`tenant_rate_limited`); a limit of the API key or of its tenant (`key_rate_limited`, "
    "`key_in_flight_limit`, `key_queued_limit`, `tenant_rate_limited`, "
    "`tenant_in_flight_limit`, `tenant_queued_limit`); or a spent budget (`budget_exceeded`, "
    "with `X-Budget-Reset` unless the budget is a total); or the upstream's own 429.",
    502: "The upstream failed or could not be reached.",
    503: "The queue (Redis) is unavailable, or every deployment's circuit is open.",
    504: "No answer within the request deadline.",
}

#: The answers of the admin API (``/admin/v1``).
_ADMIN_ERRORS = {
    **_ERRORS,
    400: "The body or a parameter is invalid (the error's `param` or message names it).",
    401: "No key, or an unknown, revoked or expired one.",
    403: "The key is not an admin key (`not_admin`).",
    404: "No such tenant or key.",
    409: "The tenant exists already (`tenant_exists`), or the key is revoked or expired "
    "(`key_not_active`).",
    503: "Redis is unavailable.",
}

_RATE_HEADERS = {
    "Retry-After": {"schema": {"type": "string"}},
    "X-Budget-Reset": {
        "description": "`budget_exceeded`: when the budget's period resets (ISO 8601, UTC).",
        "schema": {"type": "string"},
    },
}


def _errors(
    statuses: tuple[int, ...], schema: str = "ErrorObject", why: dict[int, str] = _ERRORS
) -> dict[str, Any]:
    out: dict[str, Any] = {
        str(s): {"description": why[s], "content": _json(schema)} for s in statuses
    }
    if "429" in out:
        out["429"]["headers"] = _RATE_HEADERS
    return out


_CALL_ERRORS = (400, 401, 403, 404, 413, 415, 429, 502, 503, 504)
_JOB_ERRORS = (401, 403, 404, 503)
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
        "the first job (`Idempotent-Replayed: true`); another request with it is a 422 "
        "(on a Redis Cluster, a retry while the first is being admitted is a 409).",
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
    "ResponseId": {
        "name": "response_id",
        "in": "path",
        "required": True,
        "description": "The response's id (`resp_...`).",
        "schema": {"type": "string"},
    },
    "FileId": {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}},
    "BatchId": {
        "name": "batch_id",
        "in": "path",
        "required": True,
        "description": "The batch's id (`batch_...` or `msgbatch_...`).",
        "schema": {"type": "string"},
    },
    "TenantName": {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "The tenant's name.",
        "schema": {"type": "string"},
    },
    "KeyId": {
        "name": "key_id",
        "in": "path",
        "required": True,
        "description": "The key's id (`key_...`), never its secret.",
        "schema": {"type": "string"},
    },
    "UsageFrom": {
        "name": "from",
        "in": "query",
        "description": "The first day (UTC), `YYYY-MM-DD`; default today. At most 400 days "
        "from `from` to `to`.",
        "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    },
    "UsageTo": {
        "name": "to",
        "in": "query",
        "description": "The last day (UTC, included), `YYYY-MM-DD`; default today.",
        "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    },
    "UsageModel": {
        "name": "model",
        "in": "query",
        "description": "Only this model (the name the client asked for).",
        "schema": {"type": "string"},
    },
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


#: The admin API's own security: an admin key (``auth.admin_keys``, or a key created
#: with ``"admin": true``), as a bearer token or in ``x-api-key``.
_ADMIN_SECURITY: list[dict[str, list[str]]] = [{"adminBearerAuth": []}, {"adminApiKeyAuth": []}]


def _admin(
    summary: str,
    answer: str,
    statuses: tuple[int, ...],
    *params: str,
    body: str | None = None,
    status: int = 200,
    query: tuple[dict[str, Any], ...] = (),
    body_required: bool = True,
) -> dict[str, Any]:
    """An operation of the admin API (401 and 403 come first, on every path)."""
    op: dict[str, Any] = {"summary": summary, "security": _ADMIN_SECURITY}
    if params or query:
        op["parameters"] = [*_params(*params), *query]
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": _json(body)}
        statuses = (*statuses, 413, 415)
    op["responses"] = {
        str(status): {"description": "OK", "content": _json(answer)},
        **_errors(tuple(sorted({401, 403, 503, *statuses})), why=_ADMIN_ERRORS),
    }
    return op


def _usage_query(*groups: str) -> tuple[dict[str, Any], ...]:
    alternatives = "|".join(groups)
    return (
        {
            "name": "group_by",
            "in": "query",
            "description": f"What the rows are by: a comma-separated list of {', '.join(groups)}, "
            "each at most once (default `day`); usage is summed over the rest.",
            "schema": {
                "type": "string",
                "pattern": f"^({alternatives})(,({alternatives}))*$",
            },
        },
    )


def _admin_paths() -> dict[str, Any]:
    filters = (
        {
            "name": "tenant",
            "in": "query",
            "description": "Only this tenant.",
            "schema": {"type": "string"},
        },
        {
            "name": "key",
            "in": "query",
            "description": "Only this key's id (empty: the keys of the config).",
            "schema": {"type": "string"},
        },
    )
    return {
        "/admin/v1/tenants": {
            "post": _admin(
                "Create a tenant, with its limits, budget and metadata.",
                "Tenant",
                (400, 409),
                body="TenantInput",
                status=201,
            ),
            "get": _admin("Every tenant kept in Redis.", "TenantList", ()),
        },
        "/admin/v1/tenants/{name}": {
            "get": _admin("A tenant, with its budget's spend.", "Tenant", (404,), "TenantName"),
            "patch": _admin(
                "Change a tenant: the fields given replace the tenant's (`budget: null` "
                "removes its budget).",
                "Tenant",
                (400, 404),
                "TenantName",
                body="TenantPatch",
            ),
            "delete": _admin(
                "Delete a tenant and revoke its keys.", "TenantDeleted", (404,), "TenantName"
            ),
        },
        "/admin/v1/keys": {
            "post": _admin(
                "Create an API key; the answer holds its secret (`key`), shown this once.",
                "NewApiKey",
                (400, 404),
                body="KeyInput",
                status=201,
            ),
            "get": _admin(
                "Every API key kept in Redis (never a secret).",
                "ApiKeyList",
                (),
                query=(
                    {
                        "name": "tenant",
                        "in": "query",
                        "description": "Only this tenant's keys.",
                        "schema": {"type": "string"},
                    },
                ),
            ),
        },
        "/admin/v1/keys/{key_id}": {
            "get": _admin("An API key (never its secret).", "ApiKey", (404,), "KeyId"),
            "patch": _admin(
                "Change a key: the fields given replace the key's (`budget: null` removes "
                "its budget, `expires_at: null` its expiry).",
                "ApiKey",
                (400, 404),
                "KeyId",
                body="KeyPatch",
            ),
        },
        "/admin/v1/keys/{key_id}/revoke": {
            "post": _admin(
                "Revoke a key, on every ingress process at once (within `auth.cache_s` at "
                "worst); revoking twice is harmless.",
                "ApiKey",
                (404,),
                "KeyId",
            )
        },
        "/admin/v1/keys/{key_id}/rotate": {
            "post": _admin(
                "A new secret for the key, shown this once; the current one stays valid for "
                "`grace_s`.",
                "NewApiKey",
                (400, 404, 409),
                "KeyId",
                body="Rotation",
                body_required=False,
            )
        },
        "/admin/v1/audit": {
            "get": _admin(
                "The audit log, newest first: who changed what, when (never a key).",
                "AuditList",
                (400,),
                query=(
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "Default 100.",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "description": "The `last_id` of the previous page.",
                        "schema": {"type": "string", "pattern": "^[0-9]+(-[0-9]+)?$"},
                    },
                ),
            )
        },
        "/admin/v1/usage": {
            "get": _admin(
                "Usage by day (UTC), tenant, key and model: requests, tokens, cost, errors.",
                "UsageList",
                (400,),
                "UsageFrom",
                "UsageTo",
                "UsageModel",
                query=(*filters, *_usage_query("day", "tenant", "key", "model")),
            )
        },
    }


#: The answers of the Files API.
_FILE_ERRORS = {
    **_ERRORS,
    400: "The form or a parameter is invalid, or a line of the file is not a request the "
    "broker would admit: the message names the line (`line 3: ...`), `param` the field, "
    "`code` is `invalid_batch_line` (or `too_many_lines`, `empty_file`).",
    404: "No such file (another tenant's files are not found either).",
    413: "The file exceeds `files.max_bytes`.",
    415: "The body is not `multipart/form-data`.",
    503: "Redis is unavailable.",
}

_UPLOAD = {
    "type": "object",
    "required": ["purpose", "file"],
    "properties": {
        "purpose": {"enum": ["batch"], "description": "Only `batch` is accepted."},
        "file": {
            "type": "string",
            "contentMediaType": "application/jsonl",
            "description": "A batch input file, JSON Lines: one request a line, "
            '`{"custom_id", "method": "POST", "url": "/v1/chat/completions" or '
            '"/v1/embeddings", "body"}`, each `custom_id` unique, the body a request the '
            "endpoint would admit; at most `files.max_lines` lines and `files.max_bytes` "
            "bytes. The part's filename is kept.",
        },
    },
}


def _files_op(
    summary: str,
    answer: dict[str, Any],
    statuses: tuple[int, ...],
    *params: str,
    query: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary}
    if params or query:
        op["parameters"] = [*_params(*params), *query]
    op["responses"] = {
        "200": answer,
        **_errors(tuple(sorted({401, 403, 503, *statuses})), why=_FILE_ERRORS),
    }
    return op


def _files_paths() -> dict[str, Any]:
    upload = _files_op(
        "Upload a batch's input file (checked line by line as it streams in).",
        {"description": "The file.", "content": _json("FileObject")},
        (400, 413, 415),
    )
    upload["requestBody"] = {
        "required": True,
        "content": {"multipart/form-data": {"schema": _UPLOAD}},
    }
    file_answer = {"description": "The file.", "content": _json("FileObject")}
    return {
        "/v1/files": {
            "post": upload,
            "get": _files_op(
                "The caller's files, newest first.",
                {"description": "A page of files.", "content": _json("FileList")},
                (400,),
                query=(
                    {
                        "name": "purpose",
                        "in": "query",
                        "description": "Only the files of this purpose.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "Default 10000.",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "description": "The `last_id` of the previous page.",
                        "schema": {"type": "string"},
                    },
                ),
            ),
        },
        "/v1/files/{file_id}": {
            "get": _files_op("A file.", file_answer, (404,), "FileId"),
            "delete": _files_op(
                "Delete a file and its contents.",
                {"description": "Deleted.", "content": _json("FileDeleted")},
                (404,),
                "FileId",
            ),
        },
        "/v1/files/{file_id}/content": {
            "get": _files_op(
                "The file's contents, as uploaded.",
                {
                    "description": "The file's bytes.",
                    "content": {
                        "application/octet-stream": {
                            "schema": {"description": "The bytes of the file."}
                        }
                    },
                },
                (404,),
                "FileId",
            )
        },
    }


#: The answers of the batch APIs (an Anthropic batch's errors have Anthropic's shape).
_BATCH_ERRORS = {
    **_ERRORS,
    400: "The body or a parameter is invalid (the error's `param` or message names it), or "
    "`input_file_id` names no file of the caller's with purpose `batch` (`invalid_file`).",
    403: "An admin key, which may call the admin API only (`admin_key`).",
    404: "No such batch (`batch_not_found`): another tenant's batches, and those of the other "
    "batch API, are not found either.",
    413: "The body exceeds `ingress.max_body_bytes`.",
    415: "The body is not `application/json`.",
    429: "The tenant has `files.max_batches_in_progress` batches validating or in progress "
    "(`too_many_batches`); `Retry-After` says when to try again.",
    503: "Redis is unavailable.",
}

_MESSAGE_BATCH_ERRORS = {
    **_BATCH_ERRORS,
    400: "The body or a parameter is invalid: a request `POST /v1/messages` would refuse "
    "(the message names it: `requests.<n>.params...`), a `custom_id` used twice; or the "
    "batch's results, or its deletion, before it ended.",
}

_BATCH_RETRY_AFTER = {
    "Retry-After": {
        "required": True,
        "description": "Seconds (60).",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def _batch_op(
    summary: str,
    answer: dict[str, Any],
    statuses: tuple[int, ...],
    *params: str,
    query: tuple[dict[str, Any], ...] = (),
    body: str | None = None,
    anthropic: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary}
    if params or query:
        op["parameters"] = [*_params(*params), *query]
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(body)}
        statuses = (*statuses, 400, 413, 415, 429)
    errors = _errors(
        tuple(sorted({401, 403, 503, *statuses})),
        "AnthropicError" if anthropic else "ErrorObject",
        why=_MESSAGE_BATCH_ERRORS if anthropic else _BATCH_ERRORS,
    )
    if "429" in errors:
        errors["429"]["headers"] = _BATCH_RETRY_AFTER
    op["responses"] = {"200": answer, **errors}
    return op


def _limit_query(name: str, top: int) -> tuple[dict[str, Any], ...]:
    return (
        {
            "name": "limit",
            "in": "query",
            "description": "Default 20.",
            "schema": {"type": "integer", "minimum": 1, "maximum": top},
        },
        {
            "name": name,
            "in": "query",
            "description": "The `last_id` of the previous page.",
            "schema": {"type": "string"},
        },
    )


def _batch_paths() -> dict[str, Any]:
    batch = {"description": "The batch.", "content": _json("OpenAIBatch")}
    message_batch = {"description": "The message batch.", "content": _json("MessageBatch")}
    return {
        "/v1/batches": {
            "post": _batch_op(
                "Create a batch (OpenAI) over an uploaded file: its lines run as async jobs of "
                "class `batch`, at most `files.window` at once. Its results go to an output "
                "file (successes) and an error file (failures, and lines never run), lines of "
                "`BatchOutputLine`.",
                batch,
                (),
                body="BatchRequest",
            ),
            "get": _batch_op(
                "The caller's batches, newest first.",
                {"description": "A page of batches.", "content": _json("OpenAIBatchList")},
                (400,),
                query=_limit_query("after", 100),
            ),
        },
        "/v1/batches/{batch_id}": {
            "get": _batch_op("A batch: status, counts, files.", batch, (404,), "BatchId")
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": _batch_op(
                "Cancel a batch: no further line starts, the lines queued or running are "
                "cancelled, those that finished are kept; `cancelling`, then `cancelled`. "
                "A final batch is returned as is.",
                batch,
                (404,),
                "BatchId",
            )
        },
        "/v1/messages/batches": {
            "post": _batch_op(
                "Create a message batch (Anthropic): its requests run as async jobs of class "
                "`batch`, at most `files.window` at once. Errors come in Anthropic's shape.",
                message_batch,
                (),
                body="MessageBatchCreate",
                anthropic=True,
            ),
            "get": _batch_op(
                "The caller's message batches, newest first (`before_id` is not supported).",
                {"description": "A page of message batches.", "content": _json("MessageBatchList")},
                (400,),
                query=_limit_query("after_id", 1000),
                anthropic=True,
            ),
        },
        "/v1/messages/batches/{batch_id}": {
            "get": _batch_op(
                "A message batch: processing status, counts, results URL.",
                message_batch,
                (404,),
                "BatchId",
                anthropic=True,
            ),
            "delete": _batch_op(
                "Delete an ended message batch, its requests and its results.",
                {"description": "Deleted.", "content": _json("MessageBatchDeleted")},
                (400, 404),
                "BatchId",
                anthropic=True,
            ),
        },
        "/v1/messages/batches/{batch_id}/cancel": {
            "post": _batch_op(
                "Cancel a message batch: requests not yet done end `canceled`; `canceling`, "
                "then `ended`. An ended batch is returned as is.",
                message_batch,
                (404,),
                "BatchId",
                anthropic=True,
            )
        },
        "/v1/messages/batches/{batch_id}/results": {
            "get": _batch_op(
                "An ended message batch's results: JSON Lines, one `MessageBatchResult` per "
                "request (`succeeded`, `errored`, `canceled`, `expired`), in the order they "
                "finished.",
                {
                    "description": "The results, JSON Lines.",
                    "content": {
                        "application/binary": {
                            "schema": {"description": "One `MessageBatchResult` (JSON) a line."}
                        }
                    },
                },
                (400, 404),
                "BatchId",
                anthropic=True,
            )
        },
    }


def _paths() -> dict[str, Any]:
    chat = _call(
        "Create a chat completion (OpenAI); SSE with `stream: true`.",
        "ChatRequest",
        {"description": "The completion.", "content": {**_json("ChatCompletion"), **_STREAM}},
        _errors((*_CALL_ERRORS, 409, 422)),
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
        "/v1/messages/count_tokens": {
            "post": _call(
                "Count a Messages request's input tokens (an Anthropic deployment counts).",
                "CountTokensRequest",
                {"description": "The count.", "content": _json("TokenCount")},
                _errors(_CALL_ERRORS, "AnthropicError"),
            )
        },
        "/v1/responses": {
            "post": _call(
                "Create a response (OpenAI Responses); SSE with `stream: true`; an async "
                "job of the broker's with `background: true` (answered `queued`).",
                "ResponsesRequest",
                {
                    "description": "The response.",
                    "content": {**_json("ResponseObject"), **_STREAM},
                },
                _errors(_CALL_ERRORS),
            )
        },
        "/v1/responses/{response_id}": {
            "get": {
                "summary": "A stored response: its status, and its output once completed.",
                "parameters": _params("ResponseId"),
                "responses": {
                    "200": {"description": "The response.", "content": _json("ResponseObject")},
                    **_errors((400, *_JOB_ERRORS)),
                },
            }
        },
        "/v1/responses/{response_id}/cancel": {
            "post": {
                "summary": "Cancel a background response that has not finished.",
                "parameters": _params("ResponseId"),
                "responses": {
                    "200": {"description": "The response.", "content": _json("ResponseObject")},
                    **_errors((400, *_JOB_ERRORS)),
                },
            }
        },
        "/v1/responses/{response_id}/input_items": {
            "get": {
                "summary": "A stored response's input items, earlier turns included.",
                "parameters": _params("ResponseId"),
                "responses": {
                    "200": {"description": "The items.", "content": _json("ResponseItemList")},
                    **_errors(_JOB_ERRORS),
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "The routed model names.",
                "responses": {
                    "200": {"description": "The models.", "content": _json("ModelList")},
                    **_errors((401, 403)),
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
                    **_errors((400, 401, 403, 404, 409, 413, 415, 422, 429, 503)),
                },
            },
            "get": {
                "summary": "The caller's async jobs, newest first.",
                "parameters": list_params,
                "responses": {
                    "200": {"description": "A page of jobs.", "content": _json("JobList")},
                    **_errors((400, 401, 403, 503)),
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
        "/v1/usage": {
            "get": {
                "summary": "The calling key's own usage by day and model (a key of the "
                "config: its tenant's requests made with the config's keys), and its "
                "budget's spend when it has one.",
                "parameters": [
                    *_params("UsageFrom", "UsageTo", "UsageModel"),
                    *_usage_query("day", "model"),
                ],
                "responses": {
                    "200": {"description": "Usage rows.", "content": _json("UsageList")},
                    **_errors((400, 401, 403, 503)),
                },
            }
        },
        **_files_paths(),
        **_batch_paths(),
        **_admin_paths(),
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
            "description": "A queue-based LLM gateway speaking the OpenAI and Anthropic APIs, "
            "with an admin API (/admin/v1) for tenants, API keys, limits, budgets and usage.",
        },
        "security": [{"bearerAuth": []}, {"apiKeyAuth": []}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "parameters": _PARAMETERS,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "adminBearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin key: one of `auth.admin_keys` in the config, or "
                    'a key created with `"admin": true`. It may call /admin/v1 only; an '
                    "ordinary key gets 403 there.",
                },
                "adminApiKeyAuth": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "An admin key, as `x-api-key`.",
                },
            },
        },
    }


def handler(*, metrics: bool = True) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler serving the document, encoded once now."""
    body = msgspec.json.encode(document(metrics=metrics))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return openapi_json

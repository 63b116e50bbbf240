"""Wire messages between ingress and workers, and the client request schema.

Wire structs tolerate unknown fields and give new fields defaults, so ingress
and workers of different versions interoperate during a rolling update.
Encoders and decoders are built once here and reused.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from llm_broker.shared.config import Priority, Target

# ---------------------------------------------------------------- client schema

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatMessage(msgspec.Struct):
    role: Role
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(msgspec.Struct):
    """The fields of an OpenAI chat request that the broker itself looks at.

    Every other field (tools, response_format…) travels upstream
    untouched in the raw body.
    """

    model: str
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    #: Read so that ingress can tell a sampling request (not cached) without
    #: decoding the whole body again.
    temperature: float | None = None
    #: Read for the token estimate of a tenant's tpm quota (any type: a wrong one
    #: is the upstream's to refuse, as before).
    max_tokens: Any = None
    max_completion_tokens: Any = None


chat_request_decoder = msgspec.json.Decoder(ChatRequest)


class EmbeddingsRequest(msgspec.Struct):
    """The fields of an OpenAI embeddings request that the broker looks at."""

    model: str
    #: A string, or a list of strings or of token arrays.
    input: str | list[str | int | list[int]]


embeddings_request_decoder = msgspec.json.Decoder(EmbeddingsRequest)


class JobSubmission(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/jobs``."""

    request: msgspec.Raw
    webhook_url: str | None = None
    metadata: dict[str, str] | None = None
    #: The job's priority class (as the ``X-Priority`` header).
    priority: str | None = None


job_submission_decoder = msgspec.json.Decoder(JobSubmission)

# ---------------------------------------------------------------- queue messages


class Attempt(msgspec.Struct, kw_only=True):
    """One deployment's try at a job (its retries included), carried along on fallback."""

    deployment: str
    #: HTTP status the client would have seen, and the error code.
    status: int
    error: str = ""
    retries: int = 0
    started: float = 0.0
    seconds: float = 0.0


#: Job kinds: the API a job's body is in, and its answer must be in. A chat
#: completion or an embeddings call (OpenAI), a message or a token count (Anthropic
#: Messages), a response (OpenAI Responses). A deployment whose API is the job's
#: gets the body as it came (``shared.config.native_kinds``); any other gets it
#: translated through the chat format, and its answer translated back.
CHAT = "chat"
EMBEDDINGS = "embeddings"
MESSAGES = "messages"
COUNT_TOKENS = "count_tokens"
RESPONSES = "responses"


class AnthropicMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(msgspec.Struct):
    """The fields of an Anthropic Messages request that the broker looks at (the
    body travels as it came to an Anthropic deployment)."""

    model: str
    messages: list[AnthropicMessage]
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    temperature: float | None = None


messages_request_decoder = msgspec.json.Decoder(MessagesRequest)


class CountTokensRequest(msgspec.Struct):
    """``POST /v1/messages/count_tokens``: a Messages request without ``max_tokens``."""

    model: str
    messages: list[AnthropicMessage]
    system: str | list[dict[str, Any]] | None = None


count_tokens_request_decoder = msgspec.json.Decoder(CountTokensRequest)


class ResponsesRequest(msgspec.Struct):
    """The fields of an OpenAI Responses request that the broker looks at."""

    model: str
    #: A string, or items (objects: messages, function calls and their outputs...).
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    stream: bool = False
    #: Run as an async job of the broker's, polled with ``GET /v1/responses/{id}``.
    background: bool = False
    #: Keep the response for ``previous_response_id`` and ``GET`` (default true).
    store: bool | None = None
    previous_response_id: str | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    #: Tools (objects); their shape is the deployment's to judge.
    tools: list[dict[str, Any]] | None = None


responses_request_decoder = msgspec.json.Decoder(ResponsesRequest)


class Job(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One queued call, as carried in a provider stream entry (field ``j``)."""

    id: str
    tenant: str
    provider: str
    #: The model name the client asked for (answers carry this name).
    model: str
    #: The name of the configured route it matched (``mock*`` for a wildcard): metric
    #: labels and per-deployment state use it, never the client's name.
    route: str = ""
    upstream_model: str
    stream: bool = False
    include_usage: bool = False
    #: Reply stream of the ingress process holding the client, or "" for none.
    reply_to: str = ""
    #: Unix time after which nobody waits for the answer.
    deadline: float
    created: float
    #: The client's request body, as received.
    body: bytes
    traceparent: str = ""
    kind: str = CHAT
    #: Deployments to try next, in order, when this one fails after its retries.
    fallbacks: list[Target] = []
    #: Earlier deployments' tries.
    attempts: list[Attempt] = []
    #: Seconds to keep the job's record once it is final (0: ``jobs.result_ttl_s``);
    #: a synchronous call's is short (``jobs.sync_result_ttl_s``).
    result_ttl: int = 0
    #: Response cache key to store the result under ("" for none) and for how long.
    cache_key: str = ""
    cache_ttl: int = 0
    #: Priority class (``interactive``, ``async``, ``batch``): the waiting list it
    #: joins on each provider, fallbacks included.
    priority: str = "interactive"
    #: Tokens its admission counted against its tenant's tpm quotas (an estimate;
    #: 0: none), corrected to the real usage when it settles.
    tokens: int = 0
    #: Client headers a deployment of the job's own API gets (``anthropic-beta``,
    #: ``anthropic-version``).
    headers: dict[str, str] = {}
    #: Responses: the items of the earlier turns (``previous_response_id``), a JSON
    #: array the request's ``input`` follows.
    context: bytes = b""

    @property
    def target(self) -> Target:
        return Target(self.provider, self.upstream_model)


job_encoder = msgspec.msgpack.Encoder()
job_decoder = msgspec.msgpack.Decoder(Job)

# Priority classes (shared.config.PRIORITIES), highest first.
INTERACTIVE: Priority = "interactive"
ASYNC: Priority = "async"
BATCH: Priority = "batch"

# Job statuses; a job only moves forward (queued -> in_progress -> completed |
# failed | cancelled | expired), which the scripts in shared/scripts.py enforce.
QUEUED = "queued"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
EXPIRED = "expired"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, EXPIRED)
FINAL_STATUSES = frozenset((COMPLETED, FAILED, CANCELLED, EXPIRED))

#: The error of a job whose deadline passed before it could run.
DEADLINE_ERROR = (
    b'{"error":{"message":"the request deadline passed before a worker could run it",'
    b'"type":"timeout","param":null,"code":"deadline_exceeded"}}'
)

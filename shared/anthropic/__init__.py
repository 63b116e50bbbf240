"""Translation between OpenAI Chat Completions and the Anthropic Messages API.

Pure functions and small state machines over decoded JSON; nothing here does I/O.

Ingress side (:mod:`.inbound`): the client speaks Anthropic, the broker speaks OpenAI
chat inside::

    POST /v1/messages body  --messages_to_chat-->  chat request (queued as usual)
    chat.completion         --chat_to_message--->  Anthropic message
    chat.completion.chunk   --ChunksToEvents---->  Anthropic stream events (sse_event frames them)
    broker error            --error_object------>  Anthropic error body

Worker side (:mod:`.outbound`): the upstream speaks Anthropic::

    chat request            --chat_to_messages-->  Anthropic request
    Anthropic message       --message_to_chat--->  chat.completion
    Anthropic stream events --EventsToChunks---->  chat.completion.chunk dicts

Errors (:mod:`.common`, with the helpers both sides share)::

    TranslationError (ValueError)  the request cannot be expressed in the other format;
                                   ``param`` is the dotted path of the culprit
    UpstreamStreamError            an ``error`` event in an upstream Anthropic stream
"""

from __future__ import annotations

from llm_broker.shared.anthropic.common import (
    DEFAULT_MAX_TOKENS,
    Event,
    TranslationError,
    UpstreamStreamError,
)
from llm_broker.shared.anthropic.inbound import (
    ChunksToEvents,
    chat_to_message,
    error_object,
    messages_to_chat,
    sse_event,
)
from llm_broker.shared.anthropic.outbound import EventsToChunks, chat_to_messages, message_to_chat

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "ChunksToEvents",
    "Event",
    "EventsToChunks",
    "TranslationError",
    "UpstreamStreamError",
    "chat_to_message",
    "chat_to_messages",
    "error_object",
    "message_to_chat",
    "messages_to_chat",
    "sse_event",
]

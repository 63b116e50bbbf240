"""Translation between OpenAI chat and the Anthropic Messages API (shared/anthropic/).

Exact expectations for each direction, round trips, and the streaming converters
checked against the official SDKs' own stream accumulators.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.parsed_message import ParsedMessage
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from llm_broker.shared.anthropic import (
    DEFAULT_MAX_TOKENS,
    ChunksToEvents,
    EventsToChunks,
    TranslationError,
    UpstreamStreamError,
    chat_to_message,
    chat_to_messages,
    error_object,
    message_to_chat,
    messages_to_chat,
    sse_event,
)

Json = dict[str, Any]
Events = list[tuple[str, Json]]

MODEL = "claude-test"
PNG = "iVBORw0KGgo="
EVENT_ADAPTER: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city", "input_schema": SCHEMA}
WEATHER_FUNCTION = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city", "parameters": SCHEMA},
}

# ---------------------------------------------------------------- builders


def text(value: str) -> Json:
    return {"type": "text", "text": value}


def tool_use(id: str, name: str, input: Json) -> Json:
    return {"type": "tool_use", "id": id, "name": name, "input": input}


def tool_result(tool_use_id: str, content: Any = None, **extra: Any) -> Json:
    block = {"type": "tool_result", "tool_use_id": tool_use_id, **extra}
    return block if content is None else {**block, "content": content}


def image(url: str | None = None) -> Json:
    if url is None:
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": PNG},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def image_part(url: str) -> Json:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*content: Json | str) -> Json:
    return {"role": "user", "content": content[0] if isinstance(content[0], str) else list(content)}


def assistant(*content: Json) -> Json:
    return {"role": "assistant", "content": list(content)}


def call(id: str, name: str, arguments: str) -> Json:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def anthropic_request(**fields: Any) -> Json:
    return {"model": MODEL, "max_tokens": 256, "messages": [user("Hi")], **fields}


def chat_request(**fields: Any) -> Json:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], **fields}


def completion(
    message: Json, finish_reason: str | None = "stop", usage: Json | None = None, **choice: Any
) -> Json:
    if usage is None:
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    choices = [{"index": 0, "message": message, "finish_reason": finish_reason, **choice}]
    return {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-test",
    } | {
        "choices": choices,
        "usage": usage,
    }


def chunk(delta: Json | None = None, finish_reason: str | None = None, **extra: Any) -> Json:
    choices = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    )
    head = {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-test",
    }
    return {**head, "choices": choices, **extra}


def call_delta(index: int, arguments: str, id: str | None = None, name: str | None = None) -> Json:
    if id is None:
        return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}
    function = {"name": name, "arguments": arguments}
    return {"tool_calls": [{"index": index, "id": id, "type": "function", "function": function}]}


def anthropic_message(content: list[Json], stop_reason: str = "end_turn", **usage: int) -> Json:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 34, **usage},
    }


def block_start(index: int, block: Json) -> Json:
    return {"type": "content_block_start", "index": index, "content_block": block}


def block_delta(index: int, piece: str, kind: str = "text_delta") -> Json:
    key = "text" if kind == "text_delta" else "partial_json"
    return {"type": "content_block_delta", "index": index, "delta": {"type": kind, key: piece}}


def json_delta(index: int, piece: str) -> Json:
    return block_delta(index, piece, "input_json_delta")


def block_stop(index: int) -> Json:
    return {"type": "content_block_stop", "index": index}


def accumulate(events: Events) -> ParsedMessage[Any]:
    """Run events through the anthropic SDK's own stream accumulator."""
    snapshot: ParsedMessage[Any] | None = None
    json_bufs: dict[int, bytes] = {}
    for name, data in events:
        assert name == data["type"]
        event = EVENT_ADAPTER.validate_python(data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    return snapshot


def openai_final(chunks: list[Json]) -> ChatCompletion:
    """Run chunks through the openai SDK's own stream accumulator."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for c in chunks:
        list(state.handle_chunk(ChatCompletionChunk.model_validate(c)))
    return state.get_final_completion()


def names(events: Events) -> list[str]:
    return [name for name, _ in events]


# ================================================================ ingress: requests


def test_messages_to_chat_plain_request() -> None:
    assert messages_to_chat(anthropic_request()) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 256,
    }


def test_messages_to_chat_system_string_becomes_leading_system_message() -> None:
    chat = messages_to_chat(anthropic_request(system="Be brief."))
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_messages_to_chat_system_blocks_are_joined() -> None:
    cached = {**text("Answer in French."), "cache_control": {"type": "ephemeral"}}
    chat = messages_to_chat(anthropic_request(system=[text("Be brief."), cached]))
    assert chat["messages"][0] == {"role": "system", "content": "Be brief.\n\nAnswer in French."}


def test_messages_to_chat_empty_system_adds_nothing() -> None:
    chat = messages_to_chat(anthropic_request(system=""))
    assert chat["messages"] == [{"role": "user", "content": "Hi"}]


def test_messages_to_chat_sampling_stop_stream_and_user() -> None:
    body = anthropic_request(
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        stop_sequences=["END", "STOP"],
        stream=True,
        metadata={"user_id": "u-42"},
    )
    assert messages_to_chat(body) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 256,
        "stop": ["END", "STOP"],
        "temperature": 0.3,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-42",
    }


def test_messages_to_chat_stream_false_asks_no_usage_chunk() -> None:
    chat = messages_to_chat(anthropic_request(stream=False))
    assert chat["stream"] is False
    assert "stream_options" not in chat


def test_messages_to_chat_tools() -> None:
    empty = {"type": "object", "properties": {}}
    chat = messages_to_chat(
        anthropic_request(tools=[WEATHER_TOOL, {"name": "now", "input_schema": empty}])
    )
    assert chat["tools"] == [
        WEATHER_FUNCTION,
        {"type": "function", "function": {"name": "now", "parameters": empty}},
    ]


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "get_weather"},
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
    ],
)
def test_messages_to_chat_tool_choice(tool_choice: Json, expected: Json) -> None:
    chat = messages_to_chat(anthropic_request(tools=[WEATHER_TOOL], tool_choice=tool_choice))
    assert {
        k: v for k, v in chat.items() if k in ("tool_choice", "parallel_tool_calls")
    } == expected


def test_messages_to_chat_tool_use_and_results() -> None:
    failed = tool_result("toolu_2", [text("service down"), text("retry later")], is_error=True)
    body = anthropic_request(
        messages=[
            user("Weather in Paris and Oslo?"),
            assistant(
                text("Checking."),
                tool_use("toolu_1", "get_weather", {"city": "Paris"}),
                tool_use("toolu_2", "get_weather", {"city": "Oslo"}),
            ),
            user(tool_result("toolu_1", "18C sunny"), failed, text("Summarise please.")),
        ],
        tools=[WEATHER_TOOL],
    )
    assert messages_to_chat(body)["messages"] == [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                call("toolu_1", "get_weather", '{"city":"Paris"}'),
                call("toolu_2", "get_weather", '{"city":"Oslo"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: service down\nretry later"},
        {"role": "user", "content": "Summarise please."},
    ]


def test_messages_to_chat_assistant_with_only_tool_use_has_null_content() -> None:
    body = anthropic_request(
        messages=[user("Time?"), assistant(tool_use("t1", "now", {})), user(tool_result("t1"))]
    )
    assert messages_to_chat(body)["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [call("t1", "now", "{}")]},
        {"role": "tool", "tool_call_id": "t1", "content": ""},
    ]


def test_messages_to_chat_images() -> None:
    body = anthropic_request(
        messages=[user(image(), image("https://example.com/cat.jpg"), text("What are these?"))]
    )
    assert messages_to_chat(body)["messages"] == [
        {
            "role": "user",
            "content": [
                image_part(f"data:image/png;base64,{PNG}"),
                image_part("https://example.com/cat.jpg"),
                text("What are these?"),
            ],
        }
    ]


def test_messages_to_chat_images_from_a_tool_result_go_to_the_user_turn() -> None:
    shot = image("https://example.com/shot.png")
    body = anthropic_request(
        messages=[
            user("Screenshot?"),
            assistant(tool_use("t1", "shot", {})),
            user(tool_result("t1", [text("taken"), shot])),
        ]
    )
    assert messages_to_chat(body)["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "taken"},
        {"role": "user", "content": [image_part("https://example.com/shot.png")]},
    ]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": ["hi"]}, "messages.0"),
        ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [user(text("read"), {"type": "document", "source": {}})]},
            "messages.0.content.1.type",
        ),
        ({"messages": [user({"text": "no type"})]}, "messages.0.content.0.type"),
        (
            {"messages": [user("hi"), assistant({"type": "thinking", "thinking": "hm"})]},
            "messages.1.content.0.type",
        ),
        ({"messages": [user(tool_use("t", "n", {}))]}, "messages.0.content.0.type"),
        (
            {"messages": [user("hi"), assistant({**tool_use("t", "n", {}), "input": "x"})]},
            "messages.1.content.0.input",
        ),
        (
            {"messages": [user({"type": "image", "source": {"type": "file", "file_id": "f"}})]},
            "messages.0.content.0.source.type",
        ),
        ({"messages": [user({"type": "tool_result"})]}, "messages.0.content.0.tool_use_id"),
        (
            {"messages": [user(tool_result("t", [{"type": "document"}]))]},
            "messages.0.content.0.content.0.type",
        ),
        ({"system": [{"type": "image"}]}, "system.0.type"),
        ({"system": 7}, "system"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"name": "x"}]}, "tools.0.input_schema"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"temperature": "hot"}, "temperature"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_messages_to_chat_rejects_invalid_requests(change: Json, param: str) -> None:
    body = {k: v for k, v in {**anthropic_request(), **change}.items() if v is not None}
    with pytest.raises(TranslationError) as info:
        messages_to_chat(body)
    assert info.value.param == param
    assert str(info.value).startswith(param)


def test_translation_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        messages_to_chat({"model": MODEL, "messages": [user("x")]})


# ================================================================ ingress: responses


def test_chat_to_message_text() -> None:
    message = chat_to_message(completion({"role": "assistant", "content": "Hello!"}), MODEL)
    assert message == {
        "id": "msg_abc123",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [text("Hello!")],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 7},
    }
    Message.model_validate(message)


def test_chat_to_message_keeps_an_id_without_prefix() -> None:
    body = {**completion({"role": "assistant", "content": "x"}), "id": "resp-9"}
    assert chat_to_message(body, MODEL)["id"] == "msg_resp-9"


def test_chat_to_message_tool_calls() -> None:
    calls = [
        call("call_1", "get_weather", '{"city": "Paris"}'),
        call("call_2", "now", ""),
        call("call_3", "bad", "{city"),
        call("call_4", "arr", "[1]"),
    ]
    body = completion({"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls")
    message = chat_to_message(body, MODEL)
    assert message["content"] == [
        tool_use("call_1", "get_weather", {"city": "Paris"}),
        tool_use("call_2", "now", {}),
        tool_use("call_3", "bad", {"_raw": "{city"}),
        tool_use("call_4", "arr", {"_raw": "[1]"}),
    ]
    assert message["stop_reason"] == "tool_use"
    Message.model_validate(message)


def test_chat_to_message_says_tool_use_even_if_the_server_says_stop() -> None:
    reply = {"role": "assistant", "content": "Let me look.", "tool_calls": [call("c", "now", "{}")]}
    message = chat_to_message(completion(reply, "stop"), MODEL)
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"]
    assert message["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_chat_to_message_stop_reason(finish_reason: str | None, stop_reason: str) -> None:
    message = chat_to_message(
        completion({"role": "assistant", "content": "x"}, finish_reason), MODEL
    )
    assert (message["stop_reason"], message["stop_sequence"]) == (stop_reason, None)


def test_chat_to_message_reports_a_stop_sequence_the_server_names() -> None:
    body = completion({"role": "assistant", "content": "1 2 3"}, "stop", stop_reason="END")
    message = chat_to_message(body, MODEL)
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")


def test_chat_to_message_cached_prompt_tokens() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 60},
    }
    body = completion({"role": "assistant", "content": "x"}, usage=usage)
    assert chat_to_message(body, MODEL)["usage"] == {
        "input_tokens": 40,
        "output_tokens": 5,
        "cache_read_input_tokens": 60,
    }


def test_chat_to_message_empty_answer() -> None:
    message = chat_to_message(completion({"role": "assistant", "content": ""}, usage={}), MODEL)
    assert message["content"] == []
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0}
    Message.model_validate(message)


# ================================================================ ingress: streams


def test_chunks_to_events_text_stream() -> None:
    conv = ChunksToEvents("msg_s1", MODEL)
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in ("Hel", "lo", ", world")]
    chunks += [chunk({}, "stop")]
    chunks += [chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})]
    events = [e for c in chunks for e in conv.feed(c)] + conv.finish()

    assert events == [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_s1",
                    "type": "message",
                    "role": "assistant",
                    "model": MODEL,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                },
            },
        ),
        ("content_block_start", block_start(0, text(""))),
        ("content_block_delta", block_delta(0, "Hel")),
        ("content_block_delta", block_delta(0, "lo")),
        ("content_block_delta", block_delta(0, ", world")),
        ("content_block_stop", block_stop(0)),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 3, "input_tokens": 9},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]

    final = accumulate(events)
    assert final.id == "msg_s1"
    assert final.content[0].type == "text" and final.content[0].text == "Hello, world"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 3)


def tool_stream_chunks() -> list[Json]:
    """What OpenAI streams for text followed by two parallel tool calls."""
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}),
        chunk({"content": "check."}),
        chunk(call_delta(0, "", "call_a", "get_weather")),
        chunk(call_delta(0, '{"ci')),
        chunk(call_delta(0, 'ty": "Pa')),
        chunk(call_delta(0, 'ris"}')),
        chunk(call_delta(1, '{"city"', "call_b", "get_weather")),
        chunk(call_delta(1, ': "Oslo", "unit": "C"}')),
        chunk({}, "tool_calls"),
        chunk(None, usage={"prompt_tokens": 50, "completion_tokens": 30, "total_tokens": 80}),
    ]


def test_chunks_to_events_text_then_two_tool_calls() -> None:
    conv = ChunksToEvents("msg_t1", MODEL)
    events = [e for c in tool_stream_chunks() for e in conv.feed(c)] + conv.finish()

    assert names(events) == [
        "message_start",
        *["content_block_start", "content_block_delta", "content_block_delta"],
        "content_block_stop",
        *["content_block_start", "content_block_delta", "content_block_delta"],
        *["content_block_delta", "content_block_stop"],
        *["content_block_start", "content_block_delta", "content_block_delta"],
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[5][1] == block_start(1, tool_use("call_a", "get_weather", {}))
    assert events[6][1] == json_delta(1, '{"ci')
    assert events[10][1] == block_start(2, tool_use("call_b", "get_weather", {}))
    pieces: dict[int, str] = {}
    for name, data in events:
        if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta":
            pieces[data["index"]] = pieces.get(data["index"], "") + data["delta"]["partial_json"]
    assert orjson.loads(pieces[1]) == {"city": "Paris"}
    assert orjson.loads(pieces[2]) == {"city": "Oslo", "unit": "C"}

    final = accumulate(events)
    first_text, first, second = final.content
    assert first_text.type == "text" and first_text.text == "Let me check."
    assert first.type == "tool_use" and second.type == "tool_use"
    assert (first.id, first.name, first.input) == ("call_a", "get_weather", {"city": "Paris"})
    assert (second.id, second.input) == ("call_b", {"city": "Oslo", "unit": "C"})
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (50, 30)


def test_chunks_to_events_tells_calls_all_numbered_zero_apart_by_id() -> None:
    conv = ChunksToEvents("msg_z", MODEL)
    events = conv.feed(chunk({"content": "x"}))
    events += conv.feed(chunk(call_delta(0, '{"city": "Paris"}', "c1", "get_weather")))
    events += conv.feed(chunk(call_delta(0, '{"city": "Oslo"}', "c2", "get_weather")))
    events += conv.feed(chunk({}, "tool_calls")) + conv.finish()
    final = accumulate(events)
    assert [(b.id, b.input) for b in final.content if b.type == "tool_use"] == [
        ("c1", {"city": "Paris"}),
        ("c2", {"city": "Oslo"}),
    ]


def test_chunks_to_events_text_after_a_tool_call_opens_a_new_block() -> None:
    conv = ChunksToEvents("msg_x", MODEL)
    events = conv.feed(chunk(call_delta(0, "{}", "c1", "now")))
    events += conv.feed(chunk({"content": "done"})) + conv.finish()
    assert [b.type for b in accumulate(events).content] == ["tool_use", "text"]


def test_chunks_to_events_gives_unnamed_calls_distinct_ids() -> None:
    conv = ChunksToEvents("msg_u", MODEL)
    events = [e for i in range(2) for e in conv.feed(chunk(call_delta(i, "{}")))]
    ids = [data["content_block"]["id"] for name, data in events if name == "content_block_start"]
    assert len(set(ids)) == 2


def test_chunks_to_events_finish_without_any_chunk() -> None:
    conv = ChunksToEvents("msg_empty", MODEL)
    events = conv.finish()
    assert names(events) == ["message_start", "message_delta", "message_stop"]
    final = accumulate(events)
    assert final.content == []
    assert final.stop_reason == "end_turn"
    assert conv.finish() == []


def test_chunks_to_events_length_and_usage_on_the_last_chunk() -> None:
    conv = ChunksToEvents("msg_l", MODEL)
    usage = {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}
    events = conv.feed(chunk({"content": "long"}, "length", usage=usage)) + conv.finish()
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"] == {"output_tokens": 16, "input_tokens": 4}


def test_chunks_to_events_emits_message_start_once_and_skips_empty_text() -> None:
    conv = ChunksToEvents("msg_once", MODEL)
    assert names(conv.feed(chunk({"role": "assistant"}))) == ["message_start"]
    assert conv.feed(chunk({"content": ""})) == []


def test_sse_event_frame() -> None:
    frame = sse_event("message_stop", {"type": "message_stop"})
    assert frame == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


@pytest.mark.parametrize(
    ("status", "openai_type", "anthropic_type"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (403, None, "permission_error"),
        (404, "invalid_request_error", "not_found_error"),
        (405, "invalid_request_error", "invalid_request_error"),
        (413, "invalid_request_error", "request_too_large"),
        (422, "invalid_request_error", "invalid_request_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "server_error", "api_error"),
        (502, "upstream_error", "api_error"),
        (502, "overloaded_error", "overloaded_error"),
        (503, "service_unavailable", "overloaded_error"),
        (504, "timeout", "timeout_error"),
        (529, None, "overloaded_error"),
        (599, None, "api_error"),
    ],
)
def test_error_object(status: int, openai_type: str | None, anthropic_type: str) -> None:
    assert error_object(status, "nope", openai_type) == {
        "type": "error",
        "error": {"type": anthropic_type, "message": "nope"},
    }


# ================================================================ worker: requests


def test_chat_to_messages_plain_request() -> None:
    assert chat_to_messages(chat_request(), MODEL) == {
        "model": MODEL,
        "messages": [user(text("Hi"))],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }


def test_chat_to_messages_system_developer_and_merging() -> None:
    body = chat_request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [text("Use French.")]},
            {"role": "user", "content": "Bonjour"},
            {"role": "user", "content": [text("Ça va ?")]},
            {"role": "assistant", "content": "Oui."},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": [text("Et toi ?")]},
            {"role": "system", "content": "Stay polite."},
            {"role": "user", "content": "Bien."},
        ]
    )
    out = chat_to_messages(body, MODEL)
    assert out["system"] == "Be brief.\n\nUse French.\n\nStay polite."
    assert out["messages"] == [
        user(text("Bonjour"), text("Ça va ?")),
        assistant(text("Oui."), text("Et toi ?")),
        user(text("Bien.")),
    ]


def test_chat_to_messages_tool_calls_and_results() -> None:
    calls = [
        call("call_1", "get_weather", '{"city": "Paris"}'),
        call("call_2", "get_weather", '{"city":"Oslo"}'),
    ]
    body = chat_request(
        messages=[
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [text("-3C")]},
            {"role": "user", "content": "Thanks, summarise."},
        ],
        tools=[WEATHER_FUNCTION],
    )
    out = chat_to_messages(body, MODEL)
    assert out["messages"] == [
        user(text("Weather in Paris and Oslo?")),
        assistant(
            tool_use("call_1", "get_weather", {"city": "Paris"}),
            tool_use("call_2", "get_weather", {"city": "Oslo"}),
        ),
        user(
            tool_result("call_1", "18C"), tool_result("call_2", "-3C"), text("Thanks, summarise.")
        ),
    ]
    assert out["tools"] == [WEATHER_TOOL]


def test_chat_to_messages_tool_results_come_first_in_their_user_turn() -> None:
    body = chat_request(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [call("c1", "f", "")]},
            {"role": "user", "content": "(while the tool runs)"},
            {"role": "tool", "tool_call_id": "c1", "content": ""},
        ]
    )
    assert chat_to_messages(body, MODEL)["messages"][1:] == [
        assistant(tool_use("c1", "f", {})),
        user(tool_result("c1"), text("(while the tool runs)")),
    ]


def test_chat_to_messages_images() -> None:
    data_url = {
        "type": "image_url",
        "image_url": {"url": f"data:image/PNG;base64,{PNG}", "detail": "high"},
    }
    content = [text("Compare"), data_url, image_part("https://example.com/b.jpg")]
    body = chat_request(messages=[{"role": "user", "content": content}])
    assert chat_to_messages(body, MODEL)["messages"] == [
        user(text("Compare"), image(), image("https://example.com/b.jpg"))
    ]


def test_chat_to_messages_tools_without_parameters_get_an_empty_schema() -> None:
    body = chat_request(tools=[{"type": "function", "function": {"name": "now"}}])
    assert chat_to_messages(body, MODEL)["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}}
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tool_choice": "auto"}, {"type": "auto"}),
        ({"tool_choice": "none"}, {"type": "none"}),
        ({"tool_choice": "required"}, {"type": "any"}),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            {"type": "tool", "name": "get_weather"},
        ),
        ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
        (
            {"tool_choice": "required", "parallel_tool_calls": False},
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        ({"tool_choice": "none", "parallel_tool_calls": False}, {"type": "none"}),
        ({"parallel_tool_calls": True}, None),
        ({}, None),
    ],
)
def test_chat_to_messages_tool_choice(fields: Json, expected: Json | None) -> None:
    out = chat_to_messages(chat_request(tools=[WEATHER_FUNCTION], **fields), MODEL)
    assert out.get("tool_choice") == expected


def test_chat_to_messages_drops_tool_choice_without_tools() -> None:
    out = chat_to_messages(chat_request(tool_choice="required"), MODEL)
    assert "tool_choice" not in out and "tools" not in out


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("END", ["END"]), (["a", "b"], ["a", "b"]), ([], None), (None, None), (["", "x"], ["x"])],
)
def test_chat_to_messages_stop(stop: Any, expected: list[str] | None) -> None:
    assert chat_to_messages(chat_request(stop=stop), MODEL).get("stop_sequences") == expected


@pytest.mark.parametrize(
    ("fields", "default", "expected"),
    [
        ({}, DEFAULT_MAX_TOKENS, 4096),
        ({}, 1000, 1000),
        ({"max_tokens": 50}, DEFAULT_MAX_TOKENS, 50),
        ({"max_completion_tokens": 70, "max_tokens": 50}, DEFAULT_MAX_TOKENS, 70),
    ],
)
def test_chat_to_messages_max_tokens(fields: Json, default: int, expected: int) -> None:
    out = chat_to_messages(chat_request(**fields), MODEL, default_max_tokens=default)
    assert out["max_tokens"] == expected


@pytest.mark.parametrize(
    ("temperature", "expected"), [(0, 0), (0.7, 0.7), (1, 1), (1.5, 1), (2, 1), (-0.5, 0)]
)
def test_chat_to_messages_temperature_is_clamped(temperature: float, expected: float) -> None:
    assert chat_to_messages(chat_request(temperature=temperature), MODEL)["temperature"] == expected


def test_chat_to_messages_passes_and_drops_fields() -> None:
    body = chat_request(
        top_p=0.8,
        stream=True,
        stream_options={"include_usage": True},
        user="u-7",
        n=1,
        response_format={"type": "json_object"},
        logprobs=True,
        seed=3,
        presence_penalty=0.5,
    )
    assert chat_to_messages(body, MODEL) == {
        "model": MODEL,
        "messages": [user(text("Hi"))],
        "max_tokens": DEFAULT_MAX_TOKENS,
        "top_p": 0.8,
        "stream": True,
        "metadata": {"user_id": "u-7"},
    }


def with_call(arguments: str) -> list[Json]:
    return [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [call("c1", "f", arguments)]},
    ]


def with_part(part: Json) -> list[Json]:
    return [{"role": "user", "content": [text("look"), part]}]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "messages"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "critic", "content": "x"}]}, "messages.0.role"),
        ({"messages": with_call("{oops")}, "messages.1.tool_calls.0.function.arguments"),
        ({"messages": with_call("[1, 2]")}, "messages.1.tool_calls.0.function.arguments"),
        ({"messages": with_part({"type": "input_audio"})}, "messages.0.content.1.type"),
        (
            {"messages": with_part(image_part("data:image/png,abc"))},
            "messages.0.content.1.image_url.url",
        ),
        (
            {"messages": with_part(image_part("ftp://host/a.png"))},
            "messages.0.content.1.image_url.url",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        (
            {"messages": [{"role": "system", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.type",
        ),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": "many"}, "max_completion_tokens"),
        ({"temperature": "warm"}, "temperature"),
        ({"stop": 5}, "stop"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_chat_to_messages_rejects_untranslatable_requests(change: Json, param: str) -> None:
    with pytest.raises(TranslationError) as info:
        chat_to_messages({**chat_request(), **change}, MODEL)
    assert info.value.param == param


# ================================================================ worker: responses


def test_message_to_chat_text_and_tool_use() -> None:
    content = [
        text("Checking "),
        text("now."),
        tool_use("toolu_1", "get_weather", {"city": "Oslo"}),
    ]
    out = message_to_chat(anthropic_message(content, "tool_use"), "gpt-alias", "chatcmpl-j1", 17)
    assert out == {
        "id": "chatcmpl-j1",
        "object": "chat.completion",
        "created": 17,
        "model": "gpt-alias",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking now.",
                    "tool_calls": [call("toolu_1", "get_weather", '{"city":"Oslo"}')],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
    }
    ChatCompletion.model_validate(out)


def test_message_to_chat_without_text_has_null_content() -> None:
    thinking = {"type": "thinking", "thinking": "hmm", "signature": "s"}
    message = anthropic_message([thinking, tool_use("t", "now", {})], "tool_use")
    reply = message_to_chat(message, "m", "r", 0)["choices"][0]["message"]
    assert reply == {"role": "assistant", "content": None, "tool_calls": [call("t", "now", "{}")]}


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_message_to_chat_finish_reason(stop_reason: str, finish_reason: str) -> None:
    out = message_to_chat(anthropic_message([text("x")], stop_reason), "m", "r", 0)
    assert out["choices"][0]["finish_reason"] == finish_reason


def test_message_to_chat_counts_cached_input_in_prompt_tokens() -> None:
    message = anthropic_message(
        [text("x")], cache_read_input_tokens=100, cache_creation_input_tokens=8
    )
    assert message_to_chat(message, "m", "r", 0)["usage"] == {
        "prompt_tokens": 120,
        "completion_tokens": 34,
        "total_tokens": 154,
        "prompt_tokens_details": {"cached_tokens": 100},
    }


def anthropic_tool_stream() -> list[Json]:
    """What the Messages API streams for text followed by two tool_use blocks."""
    start = {
        **anthropic_message([]),
        "stop_reason": None,
        "usage": {"input_tokens": 25, "output_tokens": 1},
    }
    return [
        {"type": "message_start", "message": start},
        block_start(0, text("")),
        {"type": "ping"},
        block_delta(0, "Okay"),
        block_delta(0, ", two."),
        block_stop(0),
        block_start(1, tool_use("toolu_A", "get_weather", {})),
        json_delta(1, ""),
        json_delta(1, '{"city": "Pa'),
        json_delta(1, 'ris"}'),
        block_stop(1),
        block_start(2, tool_use("toolu_B", "now", {})),
        json_delta(2, '{"tz":'),
        json_delta(2, ' "UTC"}'),
        block_stop(2),
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 61},
        },
        {"type": "message_stop"},
    ]


def test_events_to_chunks_text_then_two_tool_calls() -> None:
    conv = EventsToChunks("chatcmpl-j2", "gpt-alias", 17)
    chunks: list[Json] = []
    for event in anthropic_tool_stream():
        assert not conv.done
        chunks += conv.feed(event)
    assert conv.done

    for c in chunks:
        assert (c["id"], c["object"], c["created"], c["model"]) == (
            "chatcmpl-j2",
            "chat.completion.chunk",
            17,
            "gpt-alias",
        )
        ChatCompletionChunk.model_validate(c)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[:4] == [
        {"role": "assistant", "content": ""},
        {"content": "Okay"},
        {"content": ", two."},
        call_delta(0, "", "toolu_A", "get_weather"),
    ]
    assert "".join(d.get("content") or "" for d in deltas) == "Okay, two."
    arguments: dict[int, str] = {}
    for d in deltas:
        for piece in d.get("tool_calls") or ():
            arguments[piece["index"]] = (
                arguments.get(piece["index"], "") + piece["function"]["arguments"]
            )
    assert orjson.loads(arguments[0]) == {"city": "Paris"}
    assert orjson.loads(arguments[1]) == {"tz": "UTC"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes == [None] * (len(finishes) - 1) + ["tool_calls"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 25, "completion_tokens": 61, "total_tokens": 86}

    final = openai_final(chunks)
    reply = final.choices[0].message
    assert reply.content == "Okay, two."
    assert [
        c.model_dump(include={"id": True, "function": {"name", "arguments"}})
        for c in reply.tool_calls or ()
    ] == [
        {"id": "toolu_A", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "toolu_B", "function": {"name": "now", "arguments": '{"tz": "UTC"}'}},
    ]
    assert final.choices[0].finish_reason == "tool_calls"


def test_events_to_chunks_text_only() -> None:
    conv = EventsToChunks("r", "m", 1)
    events = [
        e for e in anthropic_tool_stream() if e.get("index") in (None, 0) and e["type"] != "ping"
    ]
    events[-2] = {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 5, "input_tokens": 30, "cache_read_input_tokens": 10},
    }
    chunks = [c for e in events for c in conv.feed(e)]
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]] == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Okay"}, None),
        ({"content": ", two."}, None),
        ({}, "length"),
    ]
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 40,
        "completion_tokens": 5,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 10},
    }


def test_events_to_chunks_ignores_ping_stop_thinking_and_unknown_events() -> None:
    conv = EventsToChunks("r", "m", 1)
    assert conv.feed({"type": "ping"}) == []
    assert conv.feed(block_stop(0)) == []
    assert conv.feed({"type": "something_new", "x": 1}) == []
    assert conv.feed(block_start(0, {"type": "thinking", "thinking": "", "signature": ""})) == []
    assert conv.feed(block_delta(0, "hmm", "thinking_delta")) == []


def test_events_to_chunks_error_event_raises() -> None:
    conv = EventsToChunks("r", "m", 1)
    conv.feed(anthropic_tool_stream()[0])
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(UpstreamStreamError) as info:
        conv.feed(error)
    assert info.value.error_type == "overloaded_error"
    assert str(info.value) == "Overloaded"
    assert not conv.done


# ================================================================ round trips


def test_request_round_trip_chat_to_anthropic_and_back() -> None:
    calls = [
        call("call_1", "get_weather", '{"city": "Paris", "days": [1, 2]}'),
        call("call_2", "now", "{}"),
    ]
    original = chat_request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Looking.", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        ],
        tools=[WEATHER_FUNCTION],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=300,
        stop=["END"],
        temperature=0.5,
    )
    back = messages_to_chat(chat_to_messages(original, MODEL))

    def semantics(calls: list[Json]) -> list[tuple[str, str, Any]]:
        return [
            (c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
            for c in calls
        ]

    assistant_back = back["messages"][2]
    assert assistant_back["content"] == "Looking."
    assert semantics(assistant_back["tool_calls"]) == semantics(calls)
    assert [back["messages"][i] for i in (0, 1, 3, 4)] == [
        original["messages"][i] for i in (0, 1, 3, 4)
    ]
    for key in ("tools", "tool_choice", "max_tokens", "stop", "temperature"):
        assert back[key] == original[key]


def test_request_round_trip_anthropic_to_chat_and_back() -> None:
    original = {
        "model": MODEL,
        "max_tokens": 512,
        "system": "Be brief.",
        "messages": [
            user(text("What is in this picture?"), image()),
            assistant(text("Let me zoom."), tool_use("toolu_9", "zoom", {"x": 1.5})),
            user(tool_result("toolu_9", "a cat"), text("And now?")),
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["###"],
        "temperature": 0.2,
        "top_p": 0.9,
        "stream": True,
        "metadata": {"user_id": "u-1"},
    }
    assert chat_to_messages(messages_to_chat(original), MODEL) == original


def test_response_round_trip_through_chat_completion() -> None:
    content = [text("Here."), tool_use("toolu_1", "f", {"a": [1, {"b": None}]})]
    original = anthropic_message(content, "tool_use")
    chat = message_to_chat(original, "m", "chatcmpl-01", 0)
    assert chat_to_message(chat, MODEL) == original


@pytest.mark.parametrize("stop_reason", ["end_turn", "max_tokens", "tool_use", "refusal"])
def test_stop_reason_survives_a_round_trip(stop_reason: str) -> None:
    content = [text("x")] + ([tool_use("t", "f", {})] if stop_reason == "tool_use" else [])
    chat = message_to_chat(anthropic_message(content, stop_reason), "m", "r", 0)
    assert chat_to_message(chat, MODEL)["stop_reason"] == stop_reason


def test_stream_round_trip_anthropic_events_through_chat_chunks() -> None:
    """Upstream Anthropic stream -> broker chunks -> Anthropic stream for the client."""
    upstream = anthropic_tool_stream()
    # The SDK drops pings before accumulating.
    expected = accumulate([(e["type"], e) for e in upstream if e["type"] != "ping"])

    to_chunks = EventsToChunks("chatcmpl-01", "m", 0)
    to_events = ChunksToEvents("msg_01", MODEL)
    events = [e for event in upstream for c in to_chunks.feed(event) for e in to_events.feed(c)]
    final = accumulate(events + to_events.finish())

    assert final.model_dump() == expected.model_dump()


def test_streamed_and_plain_answers_agree() -> None:
    chunks = tool_stream_chunks()
    conv = ChunksToEvents("msg_abc123", MODEL)
    streamed = accumulate([e for c in chunks for e in conv.feed(c)] + conv.finish())

    whole = openai_final(chunks).model_dump(exclude_none=True)
    plain = Message.model_validate(chat_to_message({**whole, "usage": chunks[-1]["usage"]}, MODEL))
    assert streamed.model_dump(exclude={"id"}) == plain.model_dump(exclude={"id"})

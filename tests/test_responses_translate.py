"""Translation between the OpenAI Responses API and OpenAI chat (shared/responses.py).

Requests map field by field; every response object and stream event is parsed with
the installed openai SDK's own models, and streams are replayed through the SDK's
stream accumulator and reassembled into the response the non-streamed path gives.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from llm_broker.shared.responses import (
    ChunksToResponseEvents,
    TranslationError,
    chat_to_response,
    failure_error,
    output_text,
    response_shell,
    responses_to_chat,
    sse_event,
)

Json = dict[str, Any]
Events = list[tuple[str, Json]]

MODEL = "llama-test"
RESPONSE_ID = "resp_abc123"
CREATED = 1_700_000_000
EVENT_ADAPTER: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": SCHEMA,
    "strict": True,
}
WEATHER_FUNCTION = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": SCHEMA,
        "strict": True,
    },
}
PNG_URL = "data:image/png;base64,iVBORw0KGgo="

# ---------------------------------------------------------------- builders


def request(**fields: Any) -> Json:
    return {"model": MODEL, "input": "Hi", **fields}


def completion(
    content: str | None = None,
    tool_calls: list[Json] | None = None,
    finish_reason: str = "stop",
    usage: Json | None = None,
    refusal: str | None = None,
) -> Json:
    message: Json = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage or {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }


def tool_call(call_id: str, name: str, arguments: str) -> Json:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chunk(delta: Json | None = None, finish_reason: str | None = None, usage: Any = None) -> Json:
    choices = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    )
    out: Json = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": CREATED}
    return {**out, "model": MODEL, "choices": choices, "usage": usage}


def to_response(chat: Json, body: Json | None = None) -> Json:
    response = chat_to_response(
        chat, response_id=RESPONSE_ID, model=MODEL, created_at=CREATED, request=body or request()
    )
    Response.model_validate(response)
    return response


def stream(chunks: list[Json], body: Json | None = None, start: int = 0) -> Events:
    machine = ChunksToResponseEvents(
        response_id=RESPONSE_ID,
        model=MODEL,
        created_at=CREATED,
        request=body or request(stream=True),
        sequence_number=start,
    )
    events: Events = []
    for c in chunks:
        events += machine.feed(c)
    events += machine.finish()
    assert machine.finish() == []  # finishing twice sends nothing more
    return events


def replay(events: Events, start: int = 0) -> Json:
    """Check each event with the SDK, run them through its accumulator, and rebuild
    the response from the deltas alone; return the final response object."""
    state: ResponseStreamState[object] = ResponseStreamState(input_tools=[], text_format=omit)
    assert [data["sequence_number"] for _, data in events] == list(
        range(start, start + len(events))
    )
    output: dict[int, Json] = {}
    final: Json | None = None
    for name, data in events:
        assert data["type"] == name
        event = EVENT_ADAPTER.validate_python(data)
        state.handle_event(event)
        if event.type == "response.output_item.added":
            output[event.output_index] = event.item.to_dict()
        elif event.type == "response.content_part.added":
            output[event.output_index]["content"].append(event.part.to_dict())
        elif event.type == "response.output_text.delta":
            output[event.output_index]["content"][event.content_index]["text"] += event.delta
        elif event.type == "response.refusal.delta":
            output[event.output_index]["content"][event.content_index]["refusal"] += event.delta
        elif event.type == "response.function_call_arguments.delta":
            output[event.output_index]["arguments"] += event.delta
        elif event.type == "response.output_item.done":
            assert event.item.id == output[event.output_index]["id"]
            output[event.output_index]["status"] = event.item.to_dict()["status"]
        elif event.type in ("response.completed", "response.incomplete", "response.failed"):
            final = data["response"]
    assert final is not None
    rebuilt = [output[i] for i in sorted(output)]
    assert rebuilt == final["output"]
    return final


# ---------------------------------------------------------------- requests


def test_string_input_and_instructions_become_system_then_user() -> None:
    chat = responses_to_chat(request(instructions="Be brief.", input="Hello"))
    assert chat == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
    }


def test_message_items_keep_roles_and_parts() -> None:
    body = request(
        input=[
            {"role": "developer", "content": "Answer in French."},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in these?"},
                    {"type": "input_image", "image_url": PNG_URL, "detail": "low"},
                    {"type": "input_image", "image_url": "https://example.com/cat.jpg"},
                ],
            },
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Un chat.", "annotations": []}],
            },
            {"role": "user", "content": [{"type": "input_text", "text": "Merci"}]},
        ]
    )
    assert responses_to_chat(body)["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
        {"role": "assistant", "content": "Un chat."},
        {"role": "user", "content": "Merci"},
    ]


def test_input_file_with_data_becomes_a_chat_file_part() -> None:
    part = {
        "type": "input_file",
        "filename": "a.pdf",
        "file_data": "data:application/pdf;base64,AA",
    }
    chat = responses_to_chat(request(input=[{"role": "user", "content": [part]}]))
    file = {"filename": "a.pdf", "file_data": "data:application/pdf;base64,AA"}
    assert chat["messages"] == [{"role": "user", "content": [{"type": "file", "file": file}]}]


def test_tool_round_trip_groups_calls_and_answers_with_tool_messages() -> None:
    body = request(
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Let me check."},
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
                "status": "completed",
            },
            {
                "type": "function_call",
                "call_id": "call_2",
                "name": "get_weather",
                "arguments": '{"city":"Rome"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [
                    {"type": "input_text", "text": "22C"},
                    {"type": "input_image", "image_url": PNG_URL},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "function_call",
                "call_id": "call_3",
                "name": "get_weather",
                "arguments": "{}",
            },
        ],
    )
    chat = responses_to_chat(body)
    assert chat["tools"] == [WEATHER_FUNCTION]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                tool_call("call_1", "get_weather", '{"city":"Paris"}'),
                tool_call("call_2", "get_weather", '{"city":"Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "22C"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [tool_call("call_3", "get_weather", "{}")],
        },
    ]


def test_history_comes_after_instructions_and_before_input() -> None:
    earlier: list[Json] = [
        {"role": "user", "content": "My name is Ada."},
        {
            "type": "message",
            "id": "msg_x",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Hello Ada.", "annotations": []}],
        },
    ]
    body = request(instructions="Be kind.", input="What is my name?", previous_response_id="r1")
    assert responses_to_chat(body, history=earlier)["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]


def test_an_untranslatable_earlier_turn_names_previous_response_id() -> None:
    history = [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]
    with pytest.raises(TranslationError) as info:
        responses_to_chat(request(previous_response_id="resp_1"), history=history)
    assert info.value.param == "previous_response_id"
    assert "history.0.type" in info.value.message


def test_settings_map_to_chat_and_metadata_stays_home() -> None:
    body = request(
        max_output_tokens=300,
        temperature=0.2,
        top_p=0.9,
        user="u-1",
        metadata={"ticket": "42"},
        store=False,
        parallel_tool_calls=True,  # no tools: not sent (servers reject it alone)
        reasoning={"effort": "low", "summary": "auto"},
        include=["reasoning.encrypted_content"],
        truncation="disabled",
        stream=True,
    )
    assert responses_to_chat(body) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 300,
        "user": "u-1",
        "reasoning_effort": "low",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (
            {"type": "json_schema", "name": "city", "schema": SCHEMA, "strict": True},
            {
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
            },
        ),
        ({"type": "json_object"}, {"type": "json_object"}),
        ({"type": "text"}, None),
    ],
)
def test_text_format_becomes_response_format(fmt: Json, expected: Json | None) -> None:
    chat = responses_to_chat(request(text={"format": fmt}))
    assert chat.get("response_format") == expected


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "mcp", "server_label": "x", "server_url": "https://example.com"},
        {"type": "image_generation"},
        {"type": "computer_use_preview", "display_width": 1, "display_height": 1},
    ],
)
def test_built_in_tools_are_refused_naming_the_tool(tool: Json) -> None:
    with pytest.raises(TranslationError) as info:
        responses_to_chat(request(tools=[WEATHER_TOOL, tool]))
    assert info.value.param == "tools.1.type"
    assert "only function tools" in info.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"truncation": "auto"}, "truncation"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"]}, "include.0"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
        ({"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "text.format.name"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
        ({"input": []}, "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input.0.content.0.file_id",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "u"}]}]},
            "input.0.content.0.file_url",
        ),
        (
            {"input": [{"role": "assistant", "content": [{"type": "input_image"}]}]},
            "input.0.content.0.type",
        ),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input.0.call_id"),
    ],
)
def test_untranslatable_fields_are_refused_with_their_path(fields: Json, param: str) -> None:
    with pytest.raises(TranslationError) as info:
        responses_to_chat(request(**fields))
    assert info.value.param == param
    assert info.value.message.startswith(param)


# ---------------------------------------------------------------- responses


def test_text_completion_becomes_a_completed_response() -> None:
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    body = request(instructions="Be brief.", metadata={"k": "v"}, temperature=0.5, store=False)
    response = to_response(completion("Hello!", usage=usage), body)
    assert response["id"] == RESPONSE_ID
    assert response["status"] == "completed"
    assert response["output"] == [
        {
            "id": "msg_abc123_0",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
        }
    ]
    assert response["usage"] == {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 17,
    }
    sdk = Response.model_validate(response)
    assert sdk.output_text == output_text(response) == "Hello!"
    assert (sdk.instructions, sdk.metadata, sdk.temperature) == ("Be brief.", {"k": "v"}, 0.5)
    assert response["store"] is False
    assert sdk.error is None and sdk.incomplete_details is None


def test_tool_call_completion_becomes_function_call_items() -> None:
    chat = completion(
        "Checking.",
        [
            tool_call("call_1", "get_weather", '{"city":"Paris"}'),
            tool_call("call_2", "get_weather", '{"city":"Rome"}'),
        ],
        finish_reason="tool_calls",
    )
    body = request(tools=[WEATHER_TOOL], tool_choice="required")
    response = to_response(chat, body)
    assert [item["type"] for item in response["output"]] == ["message", *["function_call"] * 2]
    assert response["output"][2] == {
        "id": "fc_abc123_2",
        "type": "function_call",
        "call_id": "call_2",
        "name": "get_weather",
        "arguments": '{"city":"Rome"}',
        "status": "completed",
    }
    sdk = Response.model_validate(response)
    assert sdk.tools[0].type == "function" and sdk.tool_choice == "required"


@pytest.mark.parametrize(
    ("finish_reason", "reason"),
    [("length", "max_output_tokens"), ("content_filter", "content_filter")],
)
def test_a_cut_off_completion_is_incomplete(finish_reason: str, reason: str) -> None:
    response = to_response(completion("Once upon", finish_reason=finish_reason))
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": reason}
    assert response["output"][0]["status"] == "incomplete"


def test_refusal_and_empty_answers_still_give_a_message() -> None:
    refused = to_response(completion(refusal="I can't help with that."))
    assert refused["output"][0]["content"] == [
        {"type": "refusal", "refusal": "I can't help with that."}
    ]
    empty = to_response(completion(""))
    assert empty["output"][0]["content"] == [{"type": "output_text", "text": "", "annotations": []}]


@pytest.mark.parametrize("status", ["queued", "in_progress", "cancelled", "failed"])
def test_response_shells_validate(status: str) -> None:
    error = failure_error(429, "slow down") if status == "failed" else None
    shell = response_shell(
        response_id=RESPONSE_ID,
        model=MODEL,
        created_at=CREATED,
        request=request(background=True, tools=[WEATHER_TOOL]),
        status=status,
        error=error,
    )
    sdk = Response.model_validate(shell)
    assert sdk.status == status and sdk.output == [] and sdk.background is True
    if error:
        assert sdk.error is not None and sdk.error.code == "rate_limit_exceeded"


def test_failure_error_codes_follow_the_status() -> None:
    assert failure_error(400, "bad")["code"] == "invalid_prompt"
    assert failure_error(502, "upstream down") == {
        "code": "server_error",
        "message": "upstream down",
    }


# ---------------------------------------------------------------- streams

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def test_streamed_text_reassembles_into_the_non_streamed_response() -> None:
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo!"}),
        chunk({}, finish_reason="stop"),
        chunk(usage=USAGE),
    ]
    events = stream(chunks)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0][1]["response"]["status"] == "in_progress"
    final = replay(events)
    assert final == to_response(completion("Hello!"), request(stream=True))


def test_streamed_tool_calls_reassemble_into_the_non_streamed_response() -> None:
    body = request(stream=True, tools=[WEATHER_TOOL])
    chunks = [
        chunk({"role": "assistant", "content": "Checking."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "get_weather"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function"}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"name": "get_weather"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city":"Rome"}'}}]}),
        chunk({}, finish_reason="tool_calls"),
        chunk(usage=USAGE),
    ]
    events = stream(chunks, body)
    names = [name for name, _ in events]
    assert names.count("response.function_call_arguments.delta") == 3
    assert names[-5:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = replay(events)
    calls = [
        tool_call("call_1", "get_weather", '{"city":"Paris"}'),
        tool_call("call_2", "get_weather", '{"city":"Rome"}'),
    ]
    assert final == to_response(completion("Checking.", calls, "tool_calls"), body)


def test_calls_numbered_zero_with_new_ids_are_separate_items() -> None:
    chunks = [
        chunk({"tool_calls": [tool_call("call_a", "f", "{}") | {"index": 0}]}),
        chunk({"tool_calls": [tool_call("call_b", "g", "{}") | {"index": 0}]}),
        chunk({}, finish_reason="tool_calls"),
    ]
    final = replay(stream(chunks))
    assert [(i["call_id"], i["name"]) for i in final["output"]] == [
        ("call_a", "f"),
        ("call_b", "g"),
    ]


def test_text_after_tool_calls_opens_a_new_message() -> None:
    chunks = [
        chunk({"tool_calls": [tool_call("call_a", "f", "{}") | {"index": 0}]}),
        chunk({"content": "Done."}),
        chunk({}, finish_reason="stop"),
    ]
    final = replay(stream(chunks))
    assert [i["type"] for i in final["output"]] == ["function_call", "message"]
    assert output_text(final) == "Done."


def test_streamed_refusal_reassembles_into_the_non_streamed_response() -> None:
    events = stream([chunk({"refusal": "I can't"}), chunk({"refusal": " help."})])
    assert "response.refusal.done" in [name for name, _ in events]
    final = replay(events)
    assert final == to_response(completion(refusal="I can't help."), request(stream=True)) | {
        "usage": final["usage"]
    }


def test_a_stream_cut_off_by_length_ends_incomplete() -> None:
    events = stream([chunk({"content": "Once upon"}), chunk({}, finish_reason="length")])
    assert events[-1][0] == "response.incomplete"
    assert events[-2][1]["item"]["status"] == "incomplete"
    final = replay(events)
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_empty_stream_still_gives_a_message() -> None:
    final = replay(stream([chunk({}, finish_reason="stop")]))
    assert final == to_response(completion(None), request(stream=True)) | {"usage": final["usage"]}


def test_sequence_numbers_resume_from_the_given_number() -> None:
    events = stream([chunk({"content": "Hi"})], start=40)
    replay(events, start=40)
    assert events[0][1]["sequence_number"] == 40


def test_a_failed_stream_ends_with_response_failed() -> None:
    machine = ChunksToResponseEvents(
        response_id=RESPONSE_ID, model=MODEL, created_at=CREATED, request=request()
    )
    events = machine.feed(chunk({"content": "Hal"}))
    events += machine.fail(failure_error(502, "upstream closed the stream"))
    assert machine.finish() == []
    assert events[-1][0] == "response.failed"
    for _, data in events:
        EVENT_ADAPTER.validate_python(data)
    failed = Response.model_validate(events[-1][1]["response"])
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.message == "upstream closed the stream"


def test_sse_event_frames_one_event() -> None:
    name, data = stream([])[0]
    frame = sse_event(name, data)
    head, body = frame.removesuffix(b"\n\n").split(b"\n")
    assert head == b"event: response.created"
    assert orjson.loads(body.removeprefix(b"data: ")) == data


def test_a_call_is_announced_once_its_name_is_known() -> None:
    chunks = [
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_x", "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        chunk({}, finish_reason="tool_calls"),
    ]
    events = stream(chunks)
    added = [data["item"] for name, data in events if name == "response.output_item.added"]
    assert [(item["call_id"], item["name"]) for item in added] == [
        ("call_x", "f"),
        ("call_abc123_1", ""),  # never named: announced when the stream ends
    ]
    final = replay(events)
    assert [item["arguments"] for item in final["output"]] == ['{"a":1}', "{}"]

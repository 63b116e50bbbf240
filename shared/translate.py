"""What every translation between API formats shares (Anthropic Messages, Gemini,
Bedrock Converse, OpenAI Responses, each to and from OpenAI chat): the error that
names the field that cannot be translated, and the shape checks that raise it with
the field's dotted path (``messages.0.content.1.type``)."""

from __future__ import annotations

from typing import Any, NamedTuple, TypeGuard

#: A stream event: its name and its data.
Event = tuple[str, dict[str, Any]]


class TranslationError(ValueError):
    """The request cannot be translated; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def bad(param: str, what: str) -> TranslationError:
    return TranslationError(f"{param}: {what}", param)


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(param, "an object is required")
    return value


def string(obj: dict[str, Any], key: str, param: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise bad(f"{param}.{key}", "a string is required")
    return value


def part_type(part: Any, param: str) -> str:
    """The ``type`` of a content part or block (an object with a string ``type``)."""
    kind = as_object(part, param).get("type")
    if not isinstance(kind, str):
        raise bad(f"{param}.type", "a string is required")
    return kind


def chat_text(content: Any, param: str) -> str:
    """Text-only OpenAI chat content (system, developer and tool messages) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(param, "a string or a list of parts is required")
    texts = []
    for j, part in enumerate(content):
        if part_type(part, f"{param}.{j}") != "text":
            raise bad(f"{param}.{j}.type", "only text parts are allowed here")
        texts.append(string(part, "text", f"{param}.{j}"))
    return "\n".join(texts)


def base64_data_url(url: str, param: str) -> tuple[str, str]:
    """The media type (lower case) and the base64 data of a ``data:<type>;base64,<data>``
    URL (``url`` starts with ``data:``)."""
    header, comma, data = url[5:].partition(",")
    media_type, *options = header.split(";")
    if not comma or not media_type.strip() or options[-1:] != ["base64"]:
        raise bad(param, "only base64 data: URLs are supported")
    return media_type.strip().lower(), data


def inline_data(url: Any, param: str, why_no_url: str) -> tuple[str, str]:
    """The media type and base64 data of a ``data:`` URL, for an API that takes the
    bytes themselves (an http(s) URL is refused with ``why_no_url``: the broker does
    not fetch URLs)."""
    if not isinstance(url, str):
        raise bad(param, "a string is required")
    if url.startswith(("http://", "https://")):
        raise bad(param, why_no_url)
    if not url.startswith("data:"):
        raise bad(param, "a base64 data: URL is required")
    return base64_data_url(url, param)


class FunctionTool(NamedTuple):
    """A chat request's function tool: its name, description (None: none) and
    ``parameters`` as given (None: none)."""

    name: str
    description: str | None
    parameters: Any


def function_tools(body: dict[str, Any]) -> list[FunctionTool]:
    """The function tools of a chat request's ``tools``; other tool types are refused."""
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise bad("tools", "a list is required")
    found = []
    for i, tool in enumerate(raw or ()):
        if as_object(tool, f"tools.{i}").get("type") != "function":
            raise bad(f"tools.{i}.type", "only function tools are supported")
        function = as_object(tool.get("function"), f"tools.{i}.function")
        description = function.get("description")
        found.append(
            FunctionTool(
                string(function, "name", f"tools.{i}.function"),
                description if isinstance(description, str) else None,
                function.get("parameters"),
            )
        )
    return found

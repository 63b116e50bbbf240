"""``GET /openapi.json``: a valid OpenAPI 3.1 document of every route the ingress serves."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from llm_broker.ingress import console
from llm_broker.ingress.app import create_app
from llm_broker.ingress.openapi import document
from llm_broker.shared.config import parse_config
from tests.conftest import ConfigFactory, Procs, chat


def _validator(doc: dict[str, Any], name: str) -> OAS31Validator:
    return OAS31Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


@pytest.mark.parametrize("metrics_port", [None, 9100])
async def test_every_route_of_the_app_is_documented_and_nothing_else(
    metrics_port: int | None,
) -> None:
    config = parse_config(
        {
            "providers": {"mock": {"type": "mock", "base_url": "http://127.0.0.1:1/v1"}},
            "models": {"mock": {"provider": "mock"}},
            "ingress": {"metrics_port": metrics_port},
        },
        {},
    )
    app = create_app(config, "pod")
    # The console's pages and the JSON its page reads are not a public API (they
    # change with the page; docs/operations.md lists them): every other route is
    # in the document.
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and not console.is_console_path(route.resource.canonical)
    }
    doc = document(metrics=metrics_port is None)
    documented = {(method, p) for p, item in doc["paths"].items() for method in item}
    assert served == documented
    assert (
        ("get", "/metrics") in served if metrics_port is None else ("get", "/metrics") not in served
    )


@pytest.mark.parametrize(
    ("operation", "headers"),
    [
        (("/v1/chat/completions", "post"), {"Prefer", "Idempotency-Key", "X-Request-Timeout"}),
        (("/v1/jobs", "post"), {"Idempotency-Key", "X-Request-Timeout"}),
        (("/v1/embeddings", "post"), {"X-Request-Timeout"}),
        (("/v1/messages", "post"), {"X-Request-Timeout"}),
    ],
)
def test_request_headers_are_documented(operation: tuple[str, str], headers: set[str]) -> None:
    doc = document()
    path, method = operation
    params = doc["paths"][path][method]["parameters"]
    names = {
        doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]["name"]
        for p in params
        if "$ref" in p
    }
    assert headers <= names


def test_calls_need_a_key_and_probes_do_not() -> None:
    doc = document()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert schemes["apiKeyAuth"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert doc["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
    admin: list[dict[str, list[str]]] = [{"adminBearerAuth": []}, {"adminApiKeyAuth": []}]
    for path, item in doc["paths"].items():
        for operation in item.values():
            public = operation.get("security") == []
            assert public == (not path.startswith(("/v1/", "/admin/"))), path
            if path.startswith("/admin/"):
                assert operation["security"] == admin, path
                assert "403" in operation["responses"], path
            if not public:
                assert "401" in operation["responses"], path


def test_errors_are_the_openai_object_and_anthropic_on_messages() -> None:
    doc = document()
    for path, item in doc["paths"].items():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if int(status) < 400 or path in ("/ready",):
                    continue
                schema = response["content"]["application/json"]["schema"]["$ref"]
                anthropic = path == "/v1/messages" or path.startswith("/v1/messages/")
                want = "AnthropicError" if anthropic else "ErrorObject"
                assert schema.endswith("/" + want), (path, status)
    error = _validator(doc, "ErrorObject")
    assert error.is_valid(
        {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    )
    assert not error.is_valid({"error": {"message": "m", "type": "invalid_request_error"}})
    anthropic = _validator(doc, "AnthropicError")
    assert anthropic.is_valid({"type": "error", "error": {"type": "api_error", "message": "m"}})
    assert not anthropic.is_valid({"error": {"message": "m", "type": "x", "param": None}})


def test_request_bodies_let_unknown_fields_through_to_the_upstream() -> None:
    doc = document()
    body = chat(tools=[{"type": "function", "function": {"name": "f"}}], seed=7, x={"y": [1]})
    body["messages"][0]["name"] = "alice"
    assert _validator(doc, "ChatRequest").is_valid(body)
    assert _validator(doc, "EmbeddingsRequest").is_valid(
        {"model": "m", "input": "hi", "dimensions": 8}
    )
    assert _validator(doc, "AnthropicRequest").is_valid(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "x": 1}
    )
    # What ingress refuses, the document refuses too.
    assert not _validator(doc, "ChatRequest").is_valid({"model": "m", "messages": []})
    assert not _validator(doc, "ChatRequest").is_valid(chat(temperature="hot"))
    assert not _validator(doc, "EmbeddingsRequest").is_valid({"model": "m", "input": ""})
    assert not _validator(doc, "AnthropicRequest").is_valid(
        {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}
    )
    job = _validator(doc, "JobSubmission")
    assert job.is_valid({"request": chat(), "metadata": {"k": "v"}})
    assert not job.is_valid({"request": chat(), "surprise": 1})
    assert not job.is_valid({"request": {"model": "m"}})


async def test_the_ingress_serves_the_document(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    _, url = procs.ingress(make_config(mock_url))
    async with http.get(f"{url}/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        served = await resp.json()
    assert served == document()

"""Upstream adapters: the HTTP call to a provider.

Every adapter takes the broker's internal request (an OpenAI chat or embeddings
body, as a dict) and gives back OpenAI-shaped answers: a ``chat.completion``,
``chat.completion.chunk`` objects, or an embeddings list.

* ``openai``, ``openai-compatible`` (vLLM, Ollama, Groq, Together… by
  ``base_url``) and ``mock`` speak the OpenAI API at ``base_url``;
* ``azure`` calls ``{base_url}/openai/deployments/{model}/…?api-version=…`` with an
  ``api-key`` header (the upstream model is the deployment name);
* ``anthropic`` translates to the Messages API at ``{base_url}/messages``
  (``base_url`` like ``https://api.anthropic.com/v1``) with ``x-api-key``.

Errors become :class:`shared.errors.UpstreamError` with the status the client
should see, marked retryable where another try may succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from llm_broker.shared import anthropic
from llm_broker.shared import body as json_body
from llm_broker.shared.config import NATIVE_KINDS, OPENAI_WIRE, ProviderConfig
from llm_broker.shared.errors import (
    BadRequest,
    UpstreamError,
    identifier,
    upstream_interrupted,
    upstream_message,
    upstream_status_error,
    upstream_timeout,
    upstream_unreachable,
)
from llm_broker.shared.loop import Expiry
from llm_broker.workers.credentials import KeyRing
from llm_broker.workers.http import (
    ConnectionPool,
    HTTPClientError,
    Origin,
    Response,
    ResponseInterrupted,
    build_request,
)

log = logging.getLogger("llm_broker.worker.upstream")

_BAD_STREAM = "upstream sent a malformed stream event"


class Upstream:
    """Base adapter: one keep-alive pool per provider, keys from files."""

    def __init__(self, name: str, cfg: ProviderConfig) -> None:
        self.name = name
        self.cfg = cfg
        #: Whether this upstream makes its credentials asynchronously (:meth:`_authorize`).
        self._async_auth = type(self)._authorize is not Upstream._authorize
        self._origin = Origin.parse(cfg.endpoint())
        self._pool = ConnectionPool(
            self._origin, connect_timeout=cfg.connect_timeout_s, proxy_url=cfg.proxy_url
        )
        self._headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        self._keys = KeyRing(name, cfg.key_files())

    def close(self) -> None:
        self._pool.close()

    def _auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    #: The job kinds this upstream serves in its own API (``shared.config.NATIVE_KINDS``).
    native: frozenset[str] = frozenset()

    def native_path(self, kind: str, model: str) -> str:
        """The path of a native kind's API."""
        raise NotImplementedError

    def _keyed(self, headers: dict[str, str]) -> tuple[str, ...]:
        """Add a call's credentials to its ``headers`` (the next key of the provider's
        files); the secrets that must never appear in an error."""
        key = self._keys.next() if self._keys else ""
        if not key:
            return ()
        headers.update(self._auth(key))
        return (key,)

    async def _authorize(self, path: str, data: bytes, headers: dict[str, str]) -> tuple[str, ...]:
        """A call's credentials, made asynchronously (a signature, a minted token) by an
        upstream that overrides this; the others' are :meth:`_keyed`, added without a
        coroutine (``_async_auth``)."""
        return self._keyed(headers)

    def _status_error(
        self, resp: Response, payload: Any, secrets: tuple[str, ...]
    ) -> UpstreamError:
        """The error of an upstream's error answer (``payload``: its decoded body)."""
        return upstream_status_error(
            resp.status,
            payload,
            resp.headers.get("retry-after"),
            resp.headers.get("retry-after-ms"),
            secrets=secrets,
        )

    async def _send(
        self, path: str, payload: dict[str, Any] | bytes, headers: dict[str, str] | None
    ) -> tuple[Response, tuple[str, ...]]:
        """Send a call; its answer (a success) and the secrets it was made with."""
        if isinstance(payload, bytes):
            data = payload
        else:
            try:
                data = json_body.dump(payload)
            except json_body.InvalidBody as e:
                raise BadRequest(str(e), code="invalid_json") from e
        merged = dict(self._headers)
        if headers:
            merged.update(headers)
        if self._async_auth:
            secrets = await self._authorize(path, data, merged)
        else:
            secrets = self._keyed(merged)
        resp = await self._pool.request(build_request(self._origin, path, data, merged))
        if resp.status >= 400:
            raise self._status_error(resp, json_or_none(await resp.read()), secrets)
        return resp, secrets

    def _unreachable(self, e: HTTPClientError) -> UpstreamError:
        """The client's error for a failed exchange: what failed, not where (that is logged)."""
        log.warning("provider %s: %s", self.name, e)
        return upstream_unreachable(e.reason)

    async def _json(
        self,
        path: str,
        payload: dict[str, Any] | bytes,
        timeout_s: float,
        headers: dict[str, str] | None,
    ) -> dict[str, Any]:
        return (await self.whole(path, payload, timeout_s, headers))[1]

    async def whole(
        self,
        path: str,
        payload: dict[str, Any] | bytes,
        timeout_s: float,
        headers: dict[str, str] | None,
    ) -> tuple[bytes, dict[str, Any]]:
        """A non-streaming call: the answer's bytes, as they came, and decoded."""
        deadlines = self._pool.loop.deadlines()
        try:
            async with Expiry(deadlines, deadlines.loop.time() + timeout_s):
                resp, _ = await self._send(path, payload, headers)
                raw = await resp.read()
        except TimeoutError as e:
            raise upstream_timeout(timeout_s) from e
        except ResponseInterrupted as e:
            raise upstream_interrupted() from e
        except HTTPClientError as e:
            raise self._unreachable(e) from e
        result = json_or_none(raw)
        if not isinstance(result, dict):
            raise UpstreamError(
                502,
                "upstream answered with something other than a JSON object",
                code="upstream_bad_response",
            )
        return raw, result

    async def _events(
        self,
        path: str,
        payload: dict[str, Any] | bytes,
        timeout_s: float,
        headers: dict[str, str] | None,
    ) -> AsyncIterator[Any]:
        """The decoded ``data:`` payloads of a streamed answer (``[DONE]`` ends it)."""
        async for _, data, _ in self.blocks(path, payload, timeout_s, headers):
            if data is None:
                return
            yield data

    async def chunks(
        self,
        path: str,
        payload: dict[str, Any] | bytes,
        timeout_s: float,
        headers: dict[str, str] | None,
    ) -> AsyncGenerator[tuple[bytes, tuple[str, ...]]]:
        """The body of a streamed answer as it comes, with the secrets the call was made
        with; within ``timeout_s``, the transport's failures mapped to errors."""
        try:
            async with asyncio.timeout(timeout_s):
                resp, secrets = await self._send(path, payload, headers)
                async for chunk in resp.chunks():
                    yield chunk, secrets
        except TimeoutError as e:
            raise upstream_timeout(timeout_s) from e
        except ResponseInterrupted as e:
            raise upstream_interrupted() from e
        except HTTPClientError as e:
            raise self._unreachable(e) from e

    async def blocks(
        self,
        path: str,
        payload: dict[str, Any] | bytes,
        timeout_s: float,
        headers: dict[str, str] | None,
        *,
        eof_ends: bool = False,
    ) -> AsyncGenerator[tuple[bytes, Any, tuple[str, ...]]]:
        """The events of a streamed answer: each whole event's bytes, as they came, its
        ``data:`` payload decoded (None for ``[DONE]``, which ends it) and the call's
        secrets. A stream that ends without ``[DONE]`` is interrupted, unless
        ``eof_ends`` (APIs without it: the caller knows its last event)."""
        secrets: tuple[str, ...] = ()
        async with contextlib.aclosing(self.chunks(path, payload, timeout_s, headers)) as body:
            splitter = SSEBlocks()
            async for chunk, secrets in body:
                for block, data in splitter.feed(chunk):
                    if data == b"[DONE]":
                        yield block, None, secrets
                        return
                    yield block, _event(data), secrets
            for block, data in splitter.end():
                yield block, _event(data), secrets
        if not eof_ends:
            raise upstream_interrupted()

    async def complete(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        """A non-streaming chat call; the ``chat.completion`` object."""
        raise NotImplementedError

    def stream(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> AsyncIterator[dict[str, Any]]:
        """A streaming chat call; yields ``chat.completion.chunk`` objects."""
        raise NotImplementedError

    async def embed(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        """An embeddings call; the OpenAI embeddings list object."""
        raise BadRequest(
            f"provider {self.name!r} ({self.cfg.type}) has no embeddings API", param="model"
        )


class OpenAIUpstream(Upstream):
    """Calls an OpenAI-compatible API at ``base_url``."""

    def __init__(self, name: str, cfg: ProviderConfig) -> None:
        super().__init__(name, cfg)
        self.native = NATIVE_KINDS[cfg.type]

    def _path(self, model: str, what: str) -> str:
        return f"/{what}"

    def native_path(self, kind: str, model: str) -> str:
        return self._path(model, kind)

    async def complete(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        body["model"] = model
        path = self._path(model, "chat/completions")
        return (await self.whole(path, body, timeout_s, headers))[1]  # (one await less)

    async def stream(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> AsyncIterator[dict[str, Any]]:
        body["model"] = model
        body["stream_options"] = {"include_usage": True}
        path = self._path(model, "chat/completions")
        async for chunk in self._events(path, body, timeout_s, headers):
            if isinstance(chunk, dict):
                if "error" in chunk and "choices" not in chunk:
                    raise upstream_status_error(502, chunk)
                yield chunk

    async def embed(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        body["model"] = model
        return await self._json(self._path(model, "embeddings"), body, timeout_s, headers)


class AzureUpstream(OpenAIUpstream):
    """Azure OpenAI: deployment URLs, ``api-version``, the ``api-key`` header."""

    def _auth(self, key: str) -> dict[str, str]:
        return {"api-key": key}

    def _path(self, model: str, what: str) -> str:
        version = quote(self.cfg.api_version or "", safe="")
        if what == "responses":  # the deployment is named in the body's model
            return f"/openai/responses?api-version={version}"
        return f"/openai/deployments/{quote(model, safe='')}/{what}?api-version={version}"


class AnthropicUpstream(Upstream):
    """The Anthropic Messages API, translated to and from the OpenAI chat format."""

    native = NATIVE_KINDS["anthropic"]

    def __init__(self, name: str, cfg: ProviderConfig) -> None:
        super().__init__(name, cfg)
        self._headers["anthropic-version"] = cfg.api_version or "2023-06-01"

    def _auth(self, key: str) -> dict[str, str]:
        return {"x-api-key": key}

    def native_path(self, kind: str, model: str) -> str:
        return "/messages/count_tokens" if kind == "count_tokens" else "/messages"

    def _request(self, body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
        try:
            payload = anthropic.chat_to_messages(body, model, self.cfg.default_max_tokens)
        except anthropic.TranslationError as e:
            raise BadRequest(str(e), param=e.param) from e
        payload["stream"] = stream
        return payload

    async def complete(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        message = await self._json(
            "/messages", self._request(body, model, False), timeout_s, headers
        )
        try:
            return anthropic.message_to_chat(message, model, str(message.get("id", "")), 0)
        except (KeyError, TypeError, ValueError) as e:
            raise UpstreamError(
                502, "upstream answered with a malformed message", code="upstream_bad_response"
            ) from e

    async def stream(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> AsyncIterator[dict[str, Any]]:
        events = anthropic.EventsToChunks("", model, 0)
        payload = self._request(body, model, True)
        async for event in self._events("/messages", payload, timeout_s, headers):
            if not isinstance(event, dict):
                continue
            try:
                chunks = events.feed(event)
            except anthropic.UpstreamStreamError as e:
                raise stream_error(e) from e
            except (KeyError, TypeError, ValueError) as e:
                raise UpstreamError(502, _BAD_STREAM, code="upstream_bad_response") from e
            for chunk in chunks:
                yield chunk
            if events.done:
                return


class SSEBlocks:
    """Splits an event stream into its events: each one's bytes (its blank line
    included) and its ``data:`` payload (an event without one is skipped: comments,
    pings without data). A payload is one ``data:`` line, as every provider here sends."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        pending = self._pending + chunk
        if b"\r" in pending:  # after joining: a CRLF may be split between two chunks
            pending = pending.replace(b"\r\n", b"\n")
        found: list[tuple[bytes, bytes]] = []
        end = pending.find(b"\n\n")
        while end >= 0:
            block, pending = pending[: end + 2], pending[end + 2 :]
            data = _data_of(block)
            if data is not None:
                found.append((block, data))
            end = pending.find(b"\n\n")
        self._pending = pending
        return found

    def end(self) -> list[tuple[bytes, bytes]]:
        """The last event, when the stream ended without its blank line."""
        data = _data_of(self._pending) if self._pending.strip() else None
        return [] if data is None else [(self._pending, data)]


def _event(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise UpstreamError(502, _BAD_STREAM, code="upstream_bad_response") from e


def _data_of(block: bytes) -> bytes | None:
    at = block.find(b"data:")
    if at < 0:
        return None
    if at and block[at - 1 : at] != b"\n":  # not at the start of a line
        at = block.find(b"\ndata:")
        if at < 0:
            return None
        at += 1
    end = block.find(b"\n", at)
    return block[at + 5 : end if end >= 0 else len(block)].strip()


def stream_error(e: anthropic.UpstreamStreamError) -> UpstreamError:
    """The error of an ``error`` event in an Anthropic stream."""
    return UpstreamError(
        529 if e.error_type == "overloaded_error" else 502,
        upstream_message(str(e)),
        type=identifier(e.error_type),
        code="upstream_error",
        retryable=True,
    )


def json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def make_upstream(name: str, cfg: ProviderConfig) -> Upstream:
    if cfg.type in OPENAI_WIRE:
        return OpenAIUpstream(name, cfg)
    if cfg.type == "azure":
        return AzureUpstream(name, cfg)
    if cfg.type == "anthropic":
        return AnthropicUpstream(name, cfg)
    if cfg.type == "gemini":
        from llm_broker.workers.gemini import GeminiUpstream

        return GeminiUpstream(name, cfg)
    if cfg.type == "bedrock":
        from llm_broker.workers.bedrock import BedrockUpstream

        return BedrockUpstream(name, cfg)
    raise ValueError(f"provider {name!r}: unknown type {cfg.type!r}")

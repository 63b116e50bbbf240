"""Upstream adapters: the HTTP call to a provider.

``openai`` speaks the OpenAI chat API at any ``base_url`` (OpenAI itself, vLLM,
Ollama, LM Studio…); ``mock`` is the same wire format against the bundled mock
server. Errors become :class:`shared.errors.UpstreamError` with the status the
client should see.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from shared.config import ProviderConfig
from shared.errors import (
    UpstreamError,
    upstream_status_error,
    upstream_timeout,
    upstream_unreachable,
)
from workers.http import (
    ConnectionPool,
    HTTPClientError,
    Origin,
    Response,
    ResponseInterrupted,
    build_request,
)

log = logging.getLogger("llm_broker.worker.upstream")


class OpenAIUpstream:
    """Calls an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, name: str, cfg: ProviderConfig) -> None:
        self.name = name
        self.cfg = cfg
        self._origin = Origin.parse(cfg.base_url)
        self._pool = ConnectionPool(
            self._origin, connect_timeout=cfg.connect_timeout_s, proxy_url=cfg.proxy_url
        )
        self._headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if cfg.api_key_file:
            key = Path(cfg.api_key_file).read_text().strip()
            log.info("provider %s: read API key from %s", name, cfg.api_key_file)
            self._headers["Authorization"] = f"Bearer {key}"

    def close(self) -> None:
        self._pool.close()

    async def _post(self, body: bytes, headers: dict[str, str] | None) -> Response:
        merged = {**self._headers, **headers} if headers else self._headers
        request = build_request(self._origin, "/chat/completions", body, merged)
        resp = await self._pool.request(request)
        if resp.status >= 400:
            raw = await resp.read()
            raise upstream_status_error(
                resp.status, _json_or_none(raw), resp.headers.get("retry-after")
            )
        return resp

    async def complete(
        self, body: bytes, timeout_s: float, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A non-streaming call; the decoded ``chat.completion`` object."""
        try:
            async with asyncio.timeout(timeout_s):
                raw = await (await self._post(body, headers)).read()
        except TimeoutError as e:
            raise upstream_timeout(timeout_s) from e
        except HTTPClientError as e:
            raise upstream_unreachable(str(e)) from e
        result = _json_or_none(raw)
        if not isinstance(result, dict):
            raise UpstreamError(
                502,
                "upstream answered with something other than a JSON object",
                code="upstream_bad_response",
            )
        return result

    async def stream(
        self, body: bytes, timeout_s: float, headers: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """A streaming call; yields each decoded ``chat.completion.chunk``."""
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self._post(body, headers)
                async for data in _sse_data(resp):
                    if data == b"[DONE]":
                        return
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError as e:
                        raise UpstreamError(
                            502,
                            "upstream sent a malformed stream event",
                            code="upstream_bad_response",
                        ) from e
                    if isinstance(chunk, dict):
                        if "error" in chunk and "choices" not in chunk:
                            raise upstream_status_error(502, chunk)
                        yield chunk
                raise UpstreamError(
                    502,
                    "upstream closed the stream before it ended",
                    code="upstream_stream_interrupted",
                )
        except TimeoutError as e:
            raise upstream_timeout(timeout_s) from e
        except ResponseInterrupted as e:
            raise UpstreamError(
                502,
                "upstream closed the stream before it ended",
                code="upstream_stream_interrupted",
            ) from e
        except HTTPClientError as e:
            raise upstream_unreachable(str(e)) from e


async def _sse_data(resp: Response) -> AsyncIterator[bytes]:
    """The payloads of the ``data:`` lines of an event stream."""
    pending = b""
    async for chunk in resp.chunks():
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):
        yield pending[5:].strip()


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def make_upstream(name: str, cfg: ProviderConfig) -> OpenAIUpstream:
    if cfg.type in ("openai", "mock"):
        return OpenAIUpstream(name, cfg)
    raise ValueError(f"provider {name!r}: unknown type {cfg.type!r}")

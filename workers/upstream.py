"""Upstream adapters: the HTTP call to a provider.

``openai`` speaks the OpenAI chat API at any ``base_url`` (OpenAI itself, vLLM,
Ollama, LM Studio…); ``mock`` is the same wire format against the bundled mock
server. Errors become :class:`shared.errors.UpstreamError` with the status the
client should see.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from shared.config import ProviderConfig
from shared.errors import (
    UpstreamError,
    upstream_status_error,
    upstream_timeout,
    upstream_unreachable,
)

log = logging.getLogger("llm_broker.worker.upstream")


class OpenAIUpstream:
    """Calls an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, name: str, cfg: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.cfg = cfg
        self._session = session
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if cfg.api_key_file:
            key = Path(cfg.api_key_file).read_text().strip()
            log.info("provider %s: read API key from %s", name, cfg.api_key_file)
            self._headers["Authorization"] = f"Bearer {key}"

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=seconds, connect=min(seconds, self.cfg.connect_timeout_s)
        )

    async def complete(
        self, body: bytes, timeout_s: float, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A non-streaming call; the decoded ``chat.completion`` object."""
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=self._merge(headers),
                timeout=self._timeout(timeout_s),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise upstream_status_error(
                        resp.status, _json_or_none(raw), resp.headers.get("Retry-After")
                    )
        except UpstreamError:
            raise
        except TimeoutError as e:
            raise upstream_timeout(timeout_s) from e
        except aiohttp.ClientError as e:
            raise upstream_unreachable(str(e) or type(e).__name__) from e
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
            async with self._session.post(
                self._url,
                data=body,
                headers=self._merge(headers),
                timeout=self._timeout(timeout_s),
            ) as resp:
                if resp.status >= 400:
                    raise upstream_status_error(
                        resp.status,
                        _json_or_none(await resp.read()),
                        resp.headers.get("Retry-After"),
                    )
                done = False
                lines = _lines_or_interrupted(resp)
                async for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
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
                if not done:
                    raise UpstreamError(
                        502,
                        "upstream closed the stream before it ended",
                        code="upstream_stream_interrupted",
                    )
        except UpstreamError:
            raise
        except TimeoutError as e:
            raise upstream_timeout(timeout_s) from e
        except aiohttp.ClientError as e:
            raise upstream_unreachable(str(e) or type(e).__name__) from e

    def _merge(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {**self._headers, **extra} if extra else self._headers


async def _lines_or_interrupted(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The lines of a response body; a connection cut mid-body is an interrupted stream."""
    try:
        async for line in resp.content:
            yield line
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
        raise UpstreamError(
            502, "upstream closed the stream before it ended", code="upstream_stream_interrupted"
        ) from e


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def make_upstream(name: str, cfg: ProviderConfig, session: aiohttp.ClientSession) -> OpenAIUpstream:
    if cfg.type in ("openai", "mock"):
        return OpenAIUpstream(name, cfg, session)
    raise ValueError(f"provider {name!r}: unknown type {cfg.type!r}")


__all__ = ["OpenAIUpstream", "make_upstream"]

"""The Gemini API (Google AI Studio or Vertex AI), translated to and from OpenAI chat.

``POST {base_url}/models/{model}:generateContent`` and
``…:streamGenerateContent?alt=sse``; the translation is :mod:`llm_broker.shared.gemini`.
AI Studio is called with the key of ``api_key_file`` in ``x-goog-api-key``. Vertex AI
(``vertex_credentials_file``: a service account's JSON key) with ``Authorization:
Bearer <token>``: google-auth signs the JWT and exchanges it at the key file's
``token_uri`` for an access token, which is reused until shortly before it expires
(one refresh at a time, in a thread: google-auth is synchronous).

Gemini's errors (``{"error": {"code", "message", "status"}}``) keep their status as
the other providers' do: 429 and 5xx are retryable, 401/403 are the broker's
credential problem (502). The key or token of the call never reaches an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from llm_broker.shared import gemini
from llm_broker.shared.config import ProviderConfig
from llm_broker.shared.errors import (
    BadRequest,
    UpstreamCredentialsRejected,
    UpstreamError,
    upstream_interrupted,
    upstream_status_error,
    upstream_unreachable,
)
from llm_broker.workers.http import Response
from llm_broker.workers.upstream import Upstream

log = logging.getLogger("llm_broker.worker.gemini")

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: A token is renewed this long before it expires (at most half its lifetime).
REFRESH_MARGIN_S = 300.0
_BAD_STREAM = "upstream sent a malformed stream event"
_BAD_ANSWER = "upstream answered with a malformed GenerateContentResponse"


class VertexTokens:
    """A service account's OAuth access tokens, minted with google-auth and cached."""

    def __init__(self, provider: str, path: str) -> None:
        self._provider = provider
        self._path = path
        self._credentials: Any = None
        self._transport: Any = None
        #: The current token and when (monotonic) to stop using it.
        self._current: tuple[str, float] | None = None
        self._refresh: asyncio.Task[tuple[str, float]] | None = None

    async def get(self) -> str:
        """A valid access token: the cached one, or one refresh shared by every caller."""
        current = self._current
        if current is not None and time.monotonic() < current[1]:
            return current[0]
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(asyncio.to_thread(self._mint))
            self._refresh.add_done_callback(_retrieve)
        # Shielded: a caller that gives up does not abort the refresh the others await.
        self._current = await asyncio.shield(self._refresh)
        return self._current[0]

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (Google refused it): the next call mints another."""
        if self._current is not None and self._current[0] == token:
            self._current = None

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self._transport is not None:
            self._transport.session.close()

    def _mint(self) -> tuple[str, float]:
        """Load the key file (once) and get a new token; runs in a thread."""
        import google.auth.exceptions
        from google.auth.transport.requests import Request
        from google.oauth2 import service_account

        if self._credentials is None:
            try:
                self._credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                    self._path, scopes=[SCOPE]
                )
            except (OSError, ValueError, KeyError) as e:
                log.error(
                    "provider %s: cannot load the service-account file %s: %s",
                    self._provider,
                    self._path,
                    type(e).__name__,
                )
                raise UpstreamCredentialsRejected(
                    502,
                    f"provider {self._provider!r} cannot load its Vertex service-account file",
                    code="upstream_auth_failed",
                ) from e
            self._transport = Request()
        credentials = self._credentials
        try:
            credentials.refresh(self._transport)
        except google.auth.exceptions.RefreshError as e:
            log.warning("provider %s: the token request was refused: %s", self._provider, e)
            if e.retryable:
                raise UpstreamError(
                    502,
                    "Google's token endpoint failed; try again",
                    code="upstream_auth_failed",
                    retryable=True,
                ) from e
            raise UpstreamCredentialsRejected(
                502,
                "Google refused the broker's Vertex service-account credentials",
                code="upstream_auth_failed",
            ) from e
        except google.auth.exceptions.TransportError as e:
            log.warning("provider %s: the token request failed: %s", self._provider, e)
            raise upstream_unreachable("the OAuth token request failed") from e
        return credentials.token, time.monotonic() + _usable_for(credentials.expiry)


def _usable_for(expiry: datetime.datetime | None) -> float:
    """Seconds to use a token expiring at ``expiry`` (google-auth: naive UTC)."""
    if expiry is None:
        return 3600.0 - REFRESH_MARGIN_S
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=datetime.UTC)
    lifetime = (expiry - datetime.datetime.now(datetime.UTC)).total_seconds()
    return max(lifetime - min(REFRESH_MARGIN_S, lifetime / 2), 0.0)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a refresh's error as seen (every waiter that is left gets it raised)."""
    if not task.cancelled():
        task.exception()


class GeminiUpstream(Upstream):
    """Gemini's generateContent API, on AI Studio (API key) or Vertex AI (OAuth)."""

    def __init__(self, name: str, cfg: ProviderConfig) -> None:
        super().__init__(name, cfg)
        path = cfg.vertex_credentials_file
        self._tokens = VertexTokens(name, path) if path else None

    def close(self) -> None:
        super().close()
        if self._tokens is not None:
            self._tokens.close()

    def _auth(self, key: str) -> dict[str, str]:
        return {"x-goog-api-key": key}

    @staticmethod
    def _path(model: str, method: str) -> str:
        name = model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"
        return f"/{quote(name, safe='/')}:{method}"

    async def _authorize(self, path: str, data: bytes, headers: dict[str, str]) -> tuple[str, ...]:
        if self._tokens is None:
            return await super()._authorize(path, data, headers)
        token = await self._tokens.get()
        headers["Authorization"] = f"Bearer {token}"
        return (token,)

    def _status_error(
        self, resp: Response, payload: Any, secrets: tuple[str, ...]
    ) -> UpstreamError:
        if resp.status == 401 and self._tokens is not None and secrets:
            self._tokens.invalidate(secrets[0])
        return upstream_status_error(
            resp.status,
            gemini.error_to_openai(payload),
            resp.headers.get("retry-after") or gemini.retry_delay(payload),
            resp.headers.get("retry-after-ms"),
            secrets=secrets,
        )

    @staticmethod
    def _request(body: dict[str, Any]) -> dict[str, Any]:
        try:
            return gemini.chat_to_gemini(body)
        except gemini.TranslationError as e:
            raise BadRequest(str(e), param=e.param) from e

    async def complete(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        path = self._path(model, "generateContent")
        answer = await self._json(path, self._request(body), timeout_s, headers)
        try:
            return gemini.response_to_chat(answer, model, 0)
        except (KeyError, TypeError, ValueError) as e:
            raise UpstreamError(502, _BAD_ANSWER, code="upstream_bad_response") from e

    async def stream(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> AsyncIterator[dict[str, Any]]:
        payload = self._request(body)
        path = self._path(model, "streamGenerateContent") + "?alt=sse"
        chunks = gemini.StreamToChunks("", model, 0)
        # Gemini's stream ends with the connection, no [DONE]: its last chunk says so.
        events = self.blocks(path, payload, timeout_s, headers, eof_ends=True)
        async with contextlib.aclosing(events):
            async for _, event, secrets in events:
                for chunk in _feed(chunks, event, secrets):
                    yield chunk
        try:
            last = chunks.end()
        except ValueError as e:
            raise upstream_interrupted() from e
        yield last


def _feed(
    chunks: gemini.StreamToChunks, event: Any, secrets: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The chat chunks of one event of the stream."""
    if not isinstance(event, dict):
        raise UpstreamError(502, _BAD_STREAM, code="upstream_bad_response")
    if isinstance(event.get("error"), dict) and "candidates" not in event:
        code = event["error"].get("code")
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
        raise upstream_status_error(status, gemini.error_to_openai(event), secrets=secrets)
    try:
        return chunks.feed(event)
    except (KeyError, TypeError, ValueError) as e:
        raise UpstreamError(502, _BAD_STREAM, code="upstream_bad_response") from e

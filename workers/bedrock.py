"""The ``bedrock`` provider type: Amazon Bedrock's Converse and ConverseStream APIs.

``POST {endpoint}/model/{modelId}/converse`` (and ``/converse-stream``), the body
translated by :mod:`llm_broker.shared.bedrock`, each request signed with AWS
Signature Version 4 by botocore's own signer over the exact bytes sent. The
credentials come from the provider's ``aws_*_file`` files (re-read when they change,
as API key files are) or else from botocore's standard chain (environment, shared
files, container or instance role; botocore refreshes temporary ones).
ConverseStream answers ``application/vnd.amazon.eventstream`` messages, decoded with
botocore's ``EventStreamBuffer``; an exception message in the stream becomes the
error it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast
from urllib.parse import quote

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.eventstream import EventStreamBuffer, ParserError
from botocore.exceptions import BotoCoreError
from botocore.session import get_session

from llm_broker.shared import bedrock
from llm_broker.shared.config import ProviderConfig
from llm_broker.shared.errors import (
    BadRequest,
    UpstreamCredentialsRejected,
    UpstreamError,
    redact,
    upstream_interrupted,
    upstream_status_error,
)
from llm_broker.workers.credentials import KeyRing
from llm_broker.workers.http import (
    Response,
)
from llm_broker.workers.upstream import Upstream, json_or_none

log = logging.getLogger("llm_broker.worker.bedrock")

_SERVICE = "bedrock"
_BAD_STREAM = "upstream sent a malformed event stream"
#: How long a fruitless look-up of the standard credential chain is not repeated.
_CHAIN_RETRY_S = 10.0


class AwsCredentials:
    """One provider's AWS credentials: its files, else botocore's standard chain."""

    def __init__(self, provider: str, cfg: ProviderConfig) -> None:
        self.provider = provider
        self._files: tuple[KeyRing, KeyRing, KeyRing | None] | None = None
        if cfg.aws_access_key_id_file and cfg.aws_secret_access_key_file:
            token = cfg.aws_session_token_file
            self._files = (
                KeyRing(provider, (cfg.aws_access_key_id_file,)),
                KeyRing(provider, (cfg.aws_secret_access_key_file,)),
                KeyRing(provider, (token,)) if token else None,
            )
        self._chain: Credentials | None = None
        self._chain_missing_at: float | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> ReadOnlyCredentials:
        """The credentials for the next call; :class:`UpstreamCredentialsRejected` if
        there are none."""
        if self._files is not None:
            key_id, secret, token = self._files
            return ReadOnlyCredentials(
                key_id.next(), secret.next(), token.next() if token else None
            )
        chain = self._chain or await self._look_up()
        try:
            if isinstance(chain, RefreshableCredentials) and chain.refresh_needed():
                # The refresh may call STS or the instance metadata service: not on the loop.
                return await asyncio.to_thread(chain.get_frozen_credentials)
            return chain.get_frozen_credentials()
        except BotoCoreError as e:
            log.error(
                "provider %s: cannot refresh AWS credentials: %s", self.provider, redact(str(e))
            )
            raise self._none() from e

    async def _look_up(self) -> Credentials:
        async with self._lock:
            if self._chain is not None:
                return self._chain
            missing_at = self._chain_missing_at
            if missing_at is None or time.monotonic() - missing_at >= _CHAIN_RETRY_S:
                try:
                    # The chain may read files and ask the instance metadata service.
                    self._chain = await asyncio.to_thread(lambda: get_session().get_credentials())
                except BotoCoreError as e:
                    log.error(
                        "provider %s: the standard AWS credential chain failed: %s",
                        self.provider,
                        redact(str(e)),
                    )
                else:
                    if self._chain is not None:
                        log.info(
                            "provider %s: AWS credentials from the standard chain", self.provider
                        )
                        return self._chain
                    log.error(
                        "provider %s: the standard AWS credential chain found none", self.provider
                    )
                self._chain_missing_at = time.monotonic()
        raise self._none()

    def _none(self) -> UpstreamCredentialsRejected:
        return UpstreamCredentialsRejected(
            502,
            f"provider {self.provider!r} has no usable AWS credentials (no credential files, "
            "and none from the environment, shared files or a role)",
            code="upstream_auth_failed",
        )


class BedrockUpstream(Upstream):
    """Amazon Bedrock's Converse API, translated to and from the OpenAI chat format."""

    def __init__(self, name: str, cfg: ProviderConfig) -> None:
        super().__init__(name, cfg)
        if self._keys:
            raise ValueError(
                f"provider {name!r}: a bedrock provider signs with AWS credentials "
                "(aws_access_key_id_file... or the standard chain); api_key_file is not used"
            )
        assert cfg.region is not None  # the config requires it for bedrock
        self._region = cfg.region
        self._url = f"{self._origin.scheme}://{self._origin.host_header}{self._origin.path}"
        self._credentials = AwsCredentials(name, cfg)

    @staticmethod
    def _path(model: str, operation: str) -> str:
        return f"/model/{quote(model, safe='-_.~')}/{operation}"

    @staticmethod
    def _request(body: dict[str, Any]) -> dict[str, Any]:
        try:
            return bedrock.chat_to_converse(body)
        except bedrock.TranslationError as e:
            raise BadRequest(str(e), param=e.param) from e

    async def _authorize(self, path: str, data: bytes, headers: dict[str, str]) -> tuple[str, ...]:
        """Sign the call with SigV4 (botocore's signer, over the bytes sent)."""
        creds = await self._credentials.current()
        signed = AWSRequest(
            method="POST",
            url=self._url + path,
            data=data,
            headers={"Host": self._origin.host_header, "Content-Type": "application/json"},
        )
        SigV4Auth(creds, _SERVICE, self._region).add_auth(signed)
        headers.update((k, v) for k, v in signed.headers.items() if k.lower() != "host")
        return tuple(s for s in (creds.secret_key, creds.token, creds.access_key) if s)

    def _status_error(
        self, resp: Response, payload: Any, secrets: tuple[str, ...]
    ) -> UpstreamError:
        etype = bedrock.error_type(resp.headers.get("x-amzn-errortype"))
        return upstream_status_error(
            bedrock.error_status(resp.status, etype),
            bedrock.error_payload(payload, etype),
            resp.headers.get("retry-after"),
            resp.headers.get("retry-after-ms"),
            secrets=secrets,
        )

    async def _messages(
        self, path: str, payload: dict[str, Any], timeout_s: float, headers: dict[str, str] | None
    ) -> AsyncGenerator[tuple[dict[str, Any], bytes, tuple[str, ...]]]:
        """The event-stream messages of a streamed answer: headers, payload, and the
        secrets the call was made with."""
        buffer = EventStreamBuffer()
        async with contextlib.aclosing(self.chunks(path, payload, timeout_s, headers)) as body:
            async for data, secrets in body:
                buffer.add_data(data)
                try:
                    found = list(buffer)
                except ParserError as e:
                    raise UpstreamError(502, _BAD_STREAM, code="upstream_bad_response") from e
                for message in found:
                    yield cast(dict[str, Any], message.headers), message.payload, secrets

    async def complete(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        path = self._path(model, "converse")
        answer = await self._json(path, self._request(body), timeout_s, headers)
        try:
            return bedrock.converse_to_chat(answer, model, "", 0)
        except (KeyError, TypeError, ValueError) as e:
            raise UpstreamError(
                502, "upstream answered with a malformed message", code="upstream_bad_response"
            ) from e

    async def stream(
        self, body: dict[str, Any], model: str, timeout_s: float, headers: dict[str, str] | None
    ) -> AsyncIterator[dict[str, Any]]:
        chunks = bedrock.StreamToChunks("", model, 0)
        path = self._path(model, "converse-stream")
        messages = self._messages(path, self._request(body), timeout_s, headers)
        async with contextlib.aclosing(messages):
            async for found, data, secrets in messages:
                kind = found.get(":message-type")
                if kind == "exception":
                    raise _stream_exception(str(found.get(":exception-type")), data, secrets)
                if kind == "error":
                    raise UpstreamError(
                        502,
                        "upstream reported an error in the stream",
                        code="upstream_error",
                        retryable=True,
                    )
                if kind != "event" or chunks.done:
                    continue  # after metadata: read on to the end, the connection is reused
                try:
                    event = orjson.loads(data)
                    if not isinstance(event, dict):
                        raise TypeError("an event payload is not an object")
                    translated = chunks.feed(str(found.get(":event-type")), event)
                except (KeyError, TypeError, ValueError) as e:
                    raise UpstreamError(502, _BAD_STREAM, code="upstream_bad_response") from e
                for chunk in translated:
                    yield chunk
        if not chunks.done:
            raise upstream_interrupted()


def _stream_exception(kind: str, data: bytes, secrets: tuple[str, ...]) -> UpstreamError:
    """An exception message inside a ConverseStream as the error it stands for."""
    status = bedrock.STREAM_EXCEPTION_STATUS.get(kind, 502)
    payload = bedrock.error_payload(json_or_none(data), kind)
    return upstream_status_error(status, payload, secrets=secrets)

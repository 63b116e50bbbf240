"""The HTTP server under the ingress app: limits, error objects, a bounded shutdown.

aiohttp answers requests it cannot parse (a header line over its limit, a
broken chunked body, a bad method) before any handler runs, in plain text.
:class:`Runner` makes those answers the same JSON error object as every
other error, and :func:`drain` stops the server within ``shutdown_delay_s +
drain_s``: a call still waiting when time is up gets a 503 that names its job,
which goes on and stays readable at ``GET /v1/jobs/{id}``.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from llm_broker.ingress.state import STATE
from llm_broker.shared.config import IngressConfig
from llm_broker.shared.errors import ErrorBody, ErrorObject

log = logging.getLogger("llm_broker.ingress")

#: A header line or field may be this long (aiohttp's default is 8190 bytes);
#: longer ones get a 400 error object from the HTTP layer.
MAX_HEADER_BYTES = 65_536


class _JsonErrorHandler(RequestHandler):
    #: After answering a malformed request, the connection reads and drops what the
    #: client still sends, for at most this long, before it closes: a socket closed
    #: with unread data resets the connection, and the client would lose the answer.
    LINGER_S = 2.0

    _linger = False

    async def start(self) -> None:
        await super().start()
        transport = self.transport
        if self._linger and transport is not None and not transport.is_closing():
            if transport.can_write_eof():
                transport.write_eof()  # the answer, then end of stream
            self._loop.call_later(self.LINGER_S, transport.close)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError | RequestPayloadError):
            # The client's fault (a header too long, a body that does not decode):
            # one line, never a traceback that any client could make us write.
            log.info("malformed HTTP request: %s", " ".join(str(exc).split())[:300])
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response began
        if status >= 500:
            err = ErrorBody("the server could not handle the request", "server_error")
        else:
            detail = message or HTTPStatus(status).phrase
            err = ErrorBody(
                f"the HTTP request is malformed: {detail[:200]}",
                "invalid_request_error",
                code="malformed_http_request",
            )
        response = web.Response(
            body=msgspec.json.encode(ErrorObject(err)),
            status=status,
            content_type="application/json",
        )
        response.force_close()
        if status < 500:
            # Keep the connection open after the answer (start() closes it later),
            # dropping what arrives meanwhile: aiohttp ignores data once
            # _force_close is set, and does not close the transport itself.
            self._force_close = True
            self._linger = True
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose connections answer HTTP-level errors with error objects."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("max_line_size", MAX_HEADER_BYTES)
        kwargs.setdefault("max_field_size", MAX_HEADER_BYTES)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same state, JSON error answers
        return server


async def drain(runner: web.AppRunner, app: web.Application) -> None:
    """Stop within ``shutdown_delay_s + drain_s``: keep serving while load balancers
    catch up, stop accepting, let calls finish, then cut off those still waiting
    (their jobs go on) and close."""
    state = app[STATE]
    cfg = state.config.ingress
    state.draining = True
    if cfg.shutdown_delay_s > 0:
        log.info("ingress: /ready fails; still serving for %.1fs", cfg.shutdown_delay_s)
        await asyncio.sleep(cfg.shutdown_delay_s)  # let load balancers catch up
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close; no new requests
    reserve = cut_off_reserve(cfg)
    log.info(
        "ingress draining: waiting up to %.1fs for %d requests in flight",
        cfg.drain_s,
        state.in_flight,
    )
    try:
        async with asyncio.timeout(cfg.drain_s - reserve):
            while state.in_flight:
                await state.idle.wait()
    except TimeoutError:
        cut = state.replies.cut_off()
        log.warning("ingress: drain time is up; %d waiting calls told to poll their job", cut)
    await runner.cleanup()  # waits up to twice its shutdown_timeout, reserve / 2


def cut_off_reserve(cfg: IngressConfig) -> float:
    """The last part of ``drain_s``, kept for answering the calls still waiting."""
    return min(1.0, cfg.drain_s / 4)

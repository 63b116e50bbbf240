"""Knowing when this ingress process is overloaded, and saying so honestly.

Two signals are checked on every API request before any work is done for it (no
body read, no Redis command):

* **requests in flight** in this process at ``ingress.overload.max_in_flight``: a
  bound on memory and file descriptors, whatever the cause;
* **event-loop lag**: a timer is due every 50 ms, and how late it fires is how long
  every ready callback waits. Past ``max_lag_ms`` the process is behind on work it
  already took (its Redis replies are read late, its answers written late), and a
  share of new API requests is shed, growing with the lag up to ``max_shed_share``
  at twice the bound, until a sample falls below it again. Never all of them:
  clients that retry at once (most load generators, some SDK settings) would
  otherwise keep the process busy answering 503s and none of their work would
  get done.

A shed request gets 503 ``overloaded`` with Retry-After, never became a job, and is
counted in ``llm_broker_shed_requests``; ``/ready`` fails while the process sheds.

After a Redis command on the request path fails, :class:`RedisProbe` tells "Redis is
down" (503 ``service_unavailable``) from "this process could not keep up" (503
``overloaded``): another round trip succeeded lately, or a PING on a connection of
its own does (at most one a second, its answer shared by every failing request).
"""

from __future__ import annotations

import asyncio

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import Gauge
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_broker.shared import anthropic
from llm_broker.shared.config import OverloadConfig
from llm_broker.shared.errors import Overloaded
from llm_broker.shared.health import LoopLag
from llm_broker.shared.redisio import REDIS_DOWN, AnyBatcher

#: How often the event-loop lag is sampled.
LAG_INTERVAL_S = 0.05


class LoadMonitor:
    """The overload signals of one process, and the answer to a shed request."""

    def __init__(self, cfg: OverloadConfig, gauge: Gauge | None = None) -> None:
        self.max_in_flight = cfg.max_in_flight
        self.max_lag_s = cfg.max_lag_ms / 1000
        self.max_shed_share = cfg.max_shed_share
        self.lag = LoopLag(LAG_INTERVAL_S, gauge)
        #: Requests owed to shedding: a share of each request, one shed per whole.
        self._owed = 0.0
        err = Overloaded(
            "this ingress process is overloaded and did not take the request; retry shortly"
        )
        self._body = msgspec.json.encode(err.body())
        self._anthropic_body = msgspec.json.encode(
            anthropic.error_object(err.status, err.message, err.type)
        )
        self._headers = {"Retry-After": str(cfg.retry_after_s)}

    def overloaded(self, in_flight: int) -> str | None:
        """Whether the process is overloaded now, and by which signal."""
        if in_flight >= self.max_in_flight:
            return "in_flight"
        if 0 < self.max_lag_s < self.lag.now_s():
            return "lag"
        return None

    def reason(self, in_flight: int) -> str | None:
        """Why this new API request must be shed ("in_flight", "lag"), or None: every
        one at the in-flight bound, a share of them while the loop lags."""
        why = self.overloaded(in_flight)
        if why != "lag":
            return why
        over = self.lag.now_s() - self.max_lag_s
        self._owed += self.max_shed_share * min(1.0, over / self.max_lag_s)
        if self._owed < 1.0:
            return None
        self._owed -= 1.0
        return "lag"

    def shed(self, api: str) -> web.Response:
        """The answer to a shed request, in the client's API ("openai", "anthropic")."""
        body = self._anthropic_body if api == "anthropic" else self._body
        return web.Response(
            body=body,
            status=Overloaded.status,
            headers=self._headers,
            content_type="application/json",
        )


class RedisProbe:
    """Whether Redis answers: a round trip of ``batcher`` succeeded after the
    failed call was made, or a PING does within ``timeout_s``, asked at most once per
    ``every_s`` (callers in between share the last answer, or the PING on its way)."""

    def __init__(
        self, client: aioredis.Redis, batcher: AnyBatcher, timeout_s: float, every_s: float = 1.0
    ) -> None:
        self._client = client
        self._batcher = batcher
        self._timeout_s = timeout_s
        self._every_s = every_s
        self._asked_at = -1e9
        self._answer: asyncio.Future[bool] | None = None

    async def answers(self, since: float) -> bool:
        """``since``: when (loop time) the failed call was made."""
        loop = asyncio.get_running_loop()
        if self._batcher.last_ok > since:
            return True
        if self._answer is None or loop.time() - self._asked_at >= self._every_s:
            self._asked_at = loop.time()
            self._answer = loop.create_task(self._ping())
        return await asyncio.shield(self._answer)

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
        except REDIS_DOWN as e:
            # A PING that timed out while this process's event loop ran late says
            # nothing of Redis (its answer may be waiting unread): only a refused or
            # broken connection, or a timeout on a punctual loop, is Redis's doing.
            timed_out = isinstance(e, TimeoutError | RedisTimeoutError)
            return timed_out and self._batcher.lagging()
        return True

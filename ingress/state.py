"""The ingress process's state, shared by every handler (``app[STATE]``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from llm_broker.ingress.access import AccessLog
from llm_broker.ingress.auth import Authenticator
from llm_broker.ingress.ids import JobIds
from llm_broker.ingress.overload import LoadMonitor, RedisProbe
from llm_broker.ingress.replies import ReplyRouter
from llm_broker.ingress.routing import Chooser
from llm_broker.shared.accounts import AccountJson, AccountStore
from llm_broker.shared.config import Config, Router
from llm_broker.shared.files import Files
from llm_broker.shared.keys import Keys
from llm_broker.shared.loop import LoopRef
from llm_broker.shared.metrics import IngressMetrics
from llm_broker.shared.redisio import AnyBatcher
from llm_broker.shared.ssrf import Network
from llm_broker.shared.store import JobStore
from llm_broker.shared.tracing import Tracing


@dataclass
class State:
    config: Config
    router: Router
    auth: Authenticator
    keys: Keys
    redis: aioredis.Redis
    batcher: AnyBatcher
    store: JobStore
    replies: ReplyRouter
    registry: CollectorRegistry
    metrics: IngressMetrics
    chooser: Chooser
    tracing: Tracing
    access: AccessLog
    load: LoadMonitor
    probe: RedisProbe
    accounts: AccountStore
    #: The job's account JSON (shared/accounts.py).
    account_json: AccountJson
    #: The Files API's files (records in Redis, contents in the file store).
    files: Files
    #: Networks webhook URLs may point to although they are not public.
    webhook_allow: tuple[Network, ...] = ()
    draining: bool = False
    #: Requests being handled, and an event set whenever that drops to 0.
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    ids: JobIds = field(default_factory=JobIds)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: The event loop, kept from the first use.
    loop: LoopRef = field(default_factory=LoopRef)


STATE = web.AppKey("state", State)

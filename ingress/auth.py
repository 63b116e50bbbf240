"""API keys: ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (as the
Anthropic SDK sends it), looked up by SHA-256: in the config first, then among
the keys kept in Redis (the admin API's).

What a process read of a Redis key is trusted for ``auth.cache_s`` (1 s); every
change is also announced on a channel, on which the process drops its cache at
once. So a revocation takes effect everywhere within about a second at worst,
and usually within a round trip.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping

from llm_broker.shared.accounts import AccountStore, Principal, principal_of
from llm_broker.shared.config import AuthConfig
from llm_broker.shared.errors import Forbidden, Unauthorized
from llm_broker.shared.redisio import REDIS_DOWN, raise_if_cancelling

log = logging.getLogger("llm_broker.ingress.auth")

#: Tenant recorded on jobs when the server runs without keys.
OPEN_TENANT = "default"
_OPEN = Principal(tenant=OPEN_TENANT)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents (None: none); raises on a malformed header."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        return key.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


class Authenticator:
    def __init__(
        self, cfg: AuthConfig, accounts: AccountStore | None = None, timeout: float = 1.0
    ) -> None:
        self._timeout = timeout
        self._config_keys = {k.sha256: Principal(tenant=k.tenant) for k in cfg.keys}
        self._admins = {
            k.sha256: Principal(tenant="", name=k.name, admin=True) for k in cfg.admin_keys
        }
        #: The model API is open (a caller without a known key is tenant "default")
        #: when the config has no API keys, unless it has admin keys and is not
        #: ``auth.open``: then every key is one created with the admin API.
        self.open = not self._config_keys and (cfg.open or not self._admins)
        self.accounts = accounts
        self._ttl = cfg.cache_s
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        #: Set when a key or tenant changed (for whoever exports what they hold).
        self.changed = asyncio.Event()

    async def _lookup(self, sha: str) -> Principal | None:
        """The principal of a key kept in Redis, through the cache."""
        if self.accounts is None:
            return None
        now = time.monotonic()
        found = self._cache.get(sha)
        if found is not None and found[1] > now:
            return found[0]
        try:
            async with asyncio.timeout(self._timeout):
                looked_up = await self.accounts.lookup(sha)
        except REDIS_DOWN:
            if found is not None:  # Redis is away: what was known a moment ago
                return found[0]
            raise
        principal = principal_of(*looked_up) if looked_up is not None else None
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[sha] = (principal, now + self._ttl)
        return principal

    def known(self, headers: Mapping[str, str]) -> Principal | None:
        """:meth:`identify`'s answer when it needs nothing from Redis (no key on an
        open server, or a key of the config file), without a coroutine; None
        otherwise (:meth:`identify` says who it is, or why not)."""
        key = presented_key(headers)
        if key is None:
            return _OPEN if self.open else None
        return self._config_keys.get(hashlib.sha256(key.encode()).hexdigest())

    async def identify(self, headers: Mapping[str, str]) -> Principal:
        """Who sends a model API request; raises :class:`Unauthorized` or
        :class:`Forbidden` (an admin key)."""
        key = presented_key(headers)
        if key is None:
            if self.open:
                return _OPEN
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        sha = hashlib.sha256(key.encode()).hexdigest()
        principal = self._config_keys.get(sha)
        if principal is not None:
            return principal
        if sha in self._admins:
            raise Forbidden("an admin key cannot call the model API", code="admin_key")
        principal = await self._lookup(sha)
        if principal is None:
            if self.open:
                return _OPEN
            raise Unauthorized("invalid API key")
        if principal.expires_at is not None and principal.expires_at <= time.time():
            self._cache.pop(sha, None)
            raise Unauthorized("invalid API key")
        if principal.admin:
            raise Forbidden("an admin key cannot call the model API", code="admin_key")
        return principal

    async def admin(self, headers: Mapping[str, str]) -> Principal:
        """The admin key of an admin API request; an ordinary key gets 403."""
        key = presented_key(headers)
        if key is None:
            raise Unauthorized(
                "missing admin key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        sha = hashlib.sha256(key.encode()).hexdigest()
        principal = self._admins.get(sha)
        if principal is not None:
            return principal
        if sha in self._config_keys:
            raise Forbidden("this key may not use the admin API", code="not_admin")
        principal = await self._lookup(sha)
        if principal is None or (
            principal.expires_at is not None and principal.expires_at <= time.time()
        ):
            raise Unauthorized("invalid API key")
        if not principal.admin:
            raise Forbidden("this key may not use the admin API", code="not_admin")
        return principal

    def forget(self) -> None:
        self._cache.clear()
        self.changed.set()

    async def listen(self) -> None:
        """Drop the cache whenever a key or tenant changes (the admin API announces
        each change); runs until cancelled."""
        if self.accounts is None:
            return
        channel = self.accounts.k.changed()
        backoff = 0.05
        while True:
            raise_if_cancelling()
            pubsub = self.accounts.pubsub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                # Changes made while not subscribed were missed: start afresh.
                self.forget()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None:
                        self.forget()
            except REDIS_DOWN as e:
                raise_if_cancelling()
                log.debug("key change listener: %s", e)
                await asyncio.sleep(backoff)  # back off while Redis is unreachable
                backoff = min(backoff * 2, 1.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

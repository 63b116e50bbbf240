"""Tenants and API keys kept in Redis, their limits and budgets, spend and usage.

A key's secret is never stored: only its SHA-256, beside the key's metadata.
Admission writes a job's *account* (its scopes' limits, budgets and the day's
usage hash) with the job's record, and the job scripts enforce and settle it in
the same calls that take and release the other limits (shared/store/scripts.py).
docs/accounts.md describes a key's life and what is exact and what estimated.
"""

from __future__ import annotations

import calendar
import fnmatch
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast

import msgspec
import orjson
import redis.asyncio as aioredis

from llm_broker.shared.config import (
    PRIORITIES,
    AccountsConfig,
    Price,
    Priority,
    check_tenant_name,
    hash_key,
)

Period = Literal["daily", "monthly", "total"]
R = TypeVar("R", "TenantRecord", "KeyRecord")

#: Costs are counted in nano-dollars (integers): sums are exact.
NANO = 1_000_000_000

#: The usage metrics counted per tenant, key, model and day.
USAGE_METRICS = ("requests", "input_tokens", "output_tokens", "cost_nusd", "errors")
_SEP = "\x1f"


class AccountError(Exception):
    """An admin request that cannot be carried out (``status``: the HTTP answer)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


# ------------------------------------------------------------------ records


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A key's or tenant's own limits (0: none). ``max_in_flight`` counts requests
    admitted and not finished (waiting or running); ``max_queued`` those waiting
    for a worker."""

    rpm: int = 0
    tpm: int = 0
    max_in_flight: int = 0
    max_queued: int = 0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_in_flight", "max_queued"):
            if not 0 <= getattr(self, name) <= 2**40:
                raise ValueError(f"limits.{name} must be from 0 (none) to 2**40")

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_in_flight or self.max_queued)


class Budget(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An amount in US dollars per period: ``daily`` and ``monthly`` reset at
    midnight UTC (of the first day of the month); ``total`` never resets."""

    usd: float
    period: Period = "monthly"

    def __post_init__(self) -> None:
        if not (0 <= self.usd <= 1e9) or math.isnan(self.usd):
            raise ValueError("budget.usd must be from 0 to 1e9")


class TenantRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    name: str
    metadata: dict[str, str] = {}
    limits: Limits = Limits()
    budget: Budget | None = None
    created_at: float
    updated_at: float


class Secret(msgspec.Struct, frozen=True, omit_defaults=True):
    """One secret of a key, by its SHA-256; ``until``: valid until then (a
    rotated-out secret's grace period), 0 for as long as the key."""

    sha256: str
    until: float = 0.0


class KeyRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: str
    tenant: str
    name: str
    #: The key's first characters (``sk-llmb-AbCd``), to tell keys apart in lists.
    hint: str
    created_at: float
    updated_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    #: Model names or patterns (``gpt-4o*``) the key may call; empty: every model.
    models: list[str] = []
    max_priority: Priority | None = None
    limits: Limits = Limits()
    budget: Budget | None = None
    #: An admin key: usable on /admin/v1 only, never on the model API.
    admin: bool = False
    secrets: list[Secret] = []

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def public(self, now: float) -> dict[str, Any]:
        """The key as the admin API shows it: never a secret, nor its hash."""
        out = msgspec.to_builtins(self)
        del out["secrets"]
        out["object"] = "api_key"
        out["status"] = self.status(now)
        rotating = [s.until for s in self.secrets if s.until]
        out["previous_secret_valid_until"] = max(rotating) if rotating else None
        return dict(out)


def tenant_public(rec: TenantRecord) -> dict[str, Any]:
    out = msgspec.to_builtins(rec)
    out["object"] = "tenant"
    return dict(out)


class TenantInput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    metadata: dict[str, str] = {}
    limits: Limits = Limits()
    budget: Budget | None = None


class TenantPatch(msgspec.Struct, forbid_unknown_fields=True):
    metadata: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    limits: Limits | msgspec.UnsetType = msgspec.UNSET
    budget: Budget | msgspec.UnsetType | None = msgspec.UNSET


class KeyInput(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str = ""
    name: str = ""
    expires_at: float | None = None
    models: list[str] = []
    max_priority: Priority | None = None
    limits: Limits = Limits()
    budget: Budget | None = None
    admin: bool = False


class KeyPatch(msgspec.Struct, forbid_unknown_fields=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    expires_at: float | msgspec.UnsetType | None = msgspec.UNSET
    models: list[str] | msgspec.UnsetType = msgspec.UNSET
    max_priority: Priority | msgspec.UnsetType | None = msgspec.UNSET
    limits: Limits | msgspec.UnsetType = msgspec.UNSET
    budget: Budget | msgspec.UnsetType | None = msgspec.UNSET


class Rotation(msgspec.Struct, forbid_unknown_fields=True):
    #: How long the old secret stays valid (default: accounts.rotation_grace_s).
    grace_s: float | None = None


# ------------------------------------------------------------------ principal


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who a request comes from: a tenant, and the key it presented when the key
    is kept in Redis (``key_id``), with what the key and its tenant allow."""

    tenant: str
    key_id: str = ""
    name: str = ""
    admin: bool = False
    expires_at: float | None = None
    models: tuple[str, ...] = ()
    max_priority: Priority | None = None
    key_limits: Limits = Limits()
    key_budget: Budget | None = None
    tenant_limits: Limits = Limits()
    tenant_budget: Budget | None = None

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def ceiling(self, tenant_ceiling: Priority) -> Priority:
        """The highest class this principal's requests may have."""
        if self.max_priority is None:
            return tenant_ceiling
        return PRIORITIES[
            max(PRIORITIES.index(tenant_ceiling), PRIORITIES.index(self.max_priority))
        ]


def principal_of(key: KeyRecord, tenant: TenantRecord | None) -> Principal:
    return Principal(
        tenant=key.tenant,
        key_id=key.id,
        name=key.name,
        admin=key.admin,
        expires_at=key.expires_at,
        models=tuple(key.models),
        max_priority=key.max_priority,
        key_limits=key.limits,
        key_budget=key.budget,
        tenant_limits=tenant.limits if tenant is not None else Limits(),
        tenant_budget=tenant.budget if tenant is not None else None,
    )


# ------------------------------------------------------------------ keys in Redis


class AccountKeys:
    """Redis key names of the accounts (docs/accounts.md lists them)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def tenant(self, name: str) -> str:
        return f"{self.prefix}acct:tenant:{name}"

    def tenants(self) -> str:
        return f"{self.prefix}acct:tenants"

    def key(self, key_id: str) -> str:
        return f"{self.prefix}acct:key:{key_id}"

    def keys(self) -> str:
        return f"{self.prefix}acct:keys"

    def secret(self, sha256: str) -> str:
        return f"{self.prefix}acct:sha:{sha256}"

    def audit(self) -> str:
        return f"{self.prefix}acct:audit"

    def changed(self) -> str:
        """Pub/sub channel: a key or tenant changed; ingress processes drop their cache."""
        return f"{self.prefix}acct:changed"

    def base(self, scope: str, name: str) -> str:
        """Base of a scope's rate windows and open and queued sets."""
        return f"{self.prefix}acct:{scope}:{len(name)}:{name}"

    def spend(self, scope: str, name: str, period: str) -> str:
        return f"{self.prefix}spend:{scope}:{len(name)}:{name}:{period}"

    def usage(self, day: str) -> str:
        return f"{self.prefix}usage:{day}"


def day_of(t: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(t))


def period_of(budget: Budget, now: float) -> tuple[str, float]:
    """The budget's current period: its tag and when it resets (0: never)."""
    d = datetime.fromtimestamp(now, UTC)
    if budget.period == "daily":
        start = calendar.timegm((d.year, d.month, d.day, 0, 0, 0))
        return "d" + d.strftime("%Y%m%d"), start + 86400
    if budget.period == "monthly":
        year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        return "m" + d.strftime("%Y%m"), calendar.timegm((year, month, 1, 0, 0, 0))
    return "total", 0.0


class Estimate(msgspec.Struct, frozen=True):
    """What admission reserves for a request: tokens and cost (nano-USD)."""

    tokens: int
    cost: int


def estimate(price: Price | None, raw_size: int, max_out: object, cap: int) -> Estimate:
    """The request's tokens (prompt bytes / 4 plus the most it may write, at most
    ``cap``) and their cost at ``price``."""
    out = max_out if isinstance(max_out, int) and max_out >= 0 else 256
    prompt = min(cap, math.ceil(raw_size / 4))
    out = min(out, cap)
    cost = 0
    if price is not None:
        cost = math.ceil(
            (prompt * price.input_usd_per_million + out * price.output_usd_per_million) * 1000
        )
    return Estimate(min(cap, prompt + out), cost)


def account(
    p: Principal,
    akeys: AccountKeys,
    cfg: AccountsConfig,
    *,
    model: str,
    price: Price | None,
    est: Estimate,
    now: float,
) -> bytes:
    """The job's account (see the scripts' ``finish``), JSON; ``b""`` when there is
    nothing to enforce or count."""
    head = _account_head(p, akeys, cfg, model, price, now)
    return b"" if head is None else _with_estimate(head, est)


class AccountJson:
    """:func:`account`, with the part that does not depend on the request's estimate
    kept per principal, model and price for the current minute (budget periods and
    days begin on a minute; a spend key's retention may be a minute long)."""

    #: At most this many kept at once (a client may name many models).
    MAX_KEPT = 10_000

    def __init__(self, akeys: AccountKeys, cfg: AccountsConfig) -> None:
        self._akeys = akeys
        self._cfg = cfg
        self._minute = -1
        self._heads: dict[tuple[Principal, str, Price | None], bytes | None] = {}

    def __call__(
        self, p: Principal, *, model: str, price: Price | None, est: Estimate, now: float
    ) -> bytes:
        minute = int(now // 60)
        if minute != self._minute or len(self._heads) >= self.MAX_KEPT:
            self._heads.clear()
            self._minute = minute
        key = (p, model, price)
        try:
            head = self._heads[key]
        except KeyError:
            head = self._heads[key] = _account_head(p, self._akeys, self._cfg, model, price, now)
        return b"" if head is None else _with_estimate(head, est)


def _with_estimate(head: bytes, est: Estimate) -> bytes:
    return head + b',"e":%d,"k":%d}' % (est.cost, est.tokens)


def _account_head(
    p: Principal,
    akeys: AccountKeys,
    cfg: AccountsConfig,
    model: str,
    price: Price | None,
    now: float,
) -> bytes | None:
    """The account's JSON without the estimate and the closing brace; None for no
    account."""
    scopes: list[dict[str, Any]] = []
    for scope, name, limits, budget in (
        ("k", p.key_id, p.key_limits, p.key_budget),
        ("t", p.tenant, p.tenant_limits, p.tenant_budget),
    ):
        if not name or (not limits.any and budget is None):
            continue
        s: dict[str, Any] = {
            "n": "key" if scope == "k" else "tenant",
            "b": akeys.base(scope, name),
            "rpm": limits.rpm,
            "tpm": limits.tpm,
            "mif": limits.max_in_flight,
            "mq": limits.max_queued,
        }
        if budget is not None:
            tag, reset = period_of(budget, now)
            s["bk"] = akeys.spend(scope, name, tag)
            s["bl"] = round(budget.usd * NANO)
            s["br"] = int(reset)
            # A period's spend is kept a while after it ends (to be looked up).
            s["bx"] = int(reset - now) + 8 * 86400 if reset else 0
        scopes.append(s)
    if not scopes and not cfg.usage:
        return None
    out: dict[str, Any] = {
        "s": scopes,
        "pi": price.input_usd_per_million * 1000 if price is not None else 0,
        "po": price.output_usd_per_million * 1000 if price is not None else 0,
    }
    if any(s["mq"] for s in scopes):
        out["q"] = 1
    if cfg.usage:
        out["u"] = akeys.usage(day_of(now))
        out["f"] = _SEP.join((p.tenant, p.key_id, model, ""))
        out["ux"] = int(cfg.usage_retention_days * 86400)
    return orjson.dumps(out)[:-1]


def has_checks(acct: bytes) -> bool:
    """Whether admission has anything to check in the account :func:`account`
    made: a scope with limits or a budget. One that only counts usage is left to
    ``finish`` (admission does not decode it)."""
    return bool(acct) and not acct.startswith(_NO_SCOPES)


#: How :func:`account`'s JSON begins when no scope has limits or a budget (orjson
#: writes the keys in the order given).
_NO_SCOPES = b'{"s":[]'


# ------------------------------------------------------------------ the store


class AccountStore:
    """The admin side: tenants, keys, audit records and usage in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        cfg: AccountsConfig,
        *,
        cluster: bool = False,
        pubsub: aioredis.Redis | None = None,
    ) -> None:
        #: On a Redis Cluster, redis-py's Cluster client: no transaction spans two
        #: slots there, so every write below touches one key, in an order that
        #: leaves nothing valid half made (a new key's secret is written last).
        self.redis = redis
        self.cluster = cluster
        #: The client that listens for changes (a Cluster client has no pub/sub:
        #: then one node's, where every node's messages arrive).
        self.pubsub = pubsub if pubsub is not None else redis
        self.k = AccountKeys(prefix)
        self.cfg = cfg

    # -------------------------------------------------------- reads (auth)

    async def lookup(self, sha256: str) -> tuple[KeyRecord, TenantRecord | None] | None:
        """The key whose secret has this hash, if valid now (not revoked, expired,
        or a rotated-out secret past its grace), and its tenant's record."""
        key_id = await self.redis.get(self.k.secret(sha256))
        if key_id is None:
            return None
        key = await self.key(key_id.decode())
        if key is None:
            return None
        now = time.time()
        secret = next((s for s in key.secrets if s.sha256 == sha256), None)
        if secret is None or (secret.until and secret.until <= now):
            return None
        if key.status(now) != "active":
            return None
        tenant = await self.tenant(key.tenant) if key.tenant else None
        return key, tenant

    async def key(self, key_id: str) -> KeyRecord | None:
        raw = await self.redis.get(self.k.key(key_id))
        return msgspec.json.decode(raw, type=KeyRecord) if raw else None

    async def tenant(self, name: str) -> TenantRecord | None:
        raw = await self.redis.get(self.k.tenant(name))
        return msgspec.json.decode(raw, type=TenantRecord) if raw else None

    # -------------------------------------------------------- tenants

    async def create_tenant(self, actor: str, spec: TenantInput) -> TenantRecord:
        try:
            check_tenant_name(spec.name)
        except ValueError as e:
            raise AccountError(400, str(e), "invalid_tenant") from e
        now = time.time()
        rec = TenantRecord(
            name=spec.name,
            metadata=_metadata(spec.metadata),
            limits=spec.limits,
            budget=spec.budget,
            created_at=now,
            updated_at=now,
        )
        created = await self.redis.set(self.k.tenant(spec.name), msgspec.json.encode(rec), nx=True)
        if not created:
            raise AccountError(409, f"tenant {spec.name!r} exists", "tenant_exists")
        await self.redis.zadd(self.k.tenants(), {spec.name: now})
        await self._changed(actor, "tenant.create", spec.name, tenant_public(rec))
        return rec

    async def list_tenants(self) -> list[TenantRecord]:
        names = [n.decode() for n in await self.redis.zrange(self.k.tenants(), 0, -1)]
        found = await self._many([self.k.tenant(n) for n in names])
        return [msgspec.json.decode(raw, type=TenantRecord) for raw in found if raw]

    async def update_tenant(self, actor: str, name: str, patch: TenantPatch) -> TenantRecord:
        def change(rec: TenantRecord) -> None:
            if patch.metadata is not msgspec.UNSET:
                rec.metadata = _metadata(patch.metadata)
            if patch.limits is not msgspec.UNSET:
                rec.limits = patch.limits
            if patch.budget is not msgspec.UNSET:
                rec.budget = patch.budget

        rec = await self._update(self.k.tenant(name), TenantRecord, change, f"tenant {name!r}")
        await self._changed(actor, "tenant.update", name, msgspec.to_builtins(patch))
        return rec

    async def delete_tenant(self, actor: str, name: str) -> None:
        """Delete a tenant and revoke its keys."""
        if await self.tenant(name) is None:
            raise AccountError(404, f"no tenant {name!r}", "not_found")
        for key in await self.list_keys(tenant=name):
            if key.revoked_at is None:
                await self.revoke_key(actor, key.id)
        await self.redis.delete(self.k.tenant(name))
        await self.redis.zrem(self.k.tenants(), name)
        await self._changed(actor, "tenant.delete", name, {})

    # -------------------------------------------------------- keys

    async def create_key(self, actor: str, spec: KeyInput) -> tuple[str, KeyRecord]:
        """A new key; returns its secret (shown this once) and its record."""
        if spec.admin:
            if spec.tenant:
                raise AccountError(400, "an admin key belongs to no tenant", "invalid_key")
        elif await self.tenant(spec.tenant) is None:
            raise AccountError(404, f"no tenant {spec.tenant!r}: create it first", "not_found")
        _check_models(spec.models)
        secret, sha = new_secret()
        now = time.time()
        rec = KeyRecord(
            id="key_" + secrets.token_hex(12),
            tenant=spec.tenant,
            name=spec.name[:200],
            hint=secret[:12],
            created_at=now,
            updated_at=now,
            expires_at=spec.expires_at,
            models=spec.models,
            max_priority=spec.max_priority,
            limits=spec.limits,
            budget=spec.budget,
            admin=spec.admin,
            secrets=[Secret(sha)],
        )
        # The secret's lookup last: until it is written the key cannot be used, and
        # a failure before it leaves a listed key whose secret nobody was given.
        await self.redis.set(self.k.key(rec.id), msgspec.json.encode(rec))
        await self.redis.zadd(self.k.keys(), {rec.id: now})
        await self.redis.set(self.k.secret(sha), rec.id)
        await self._changed(actor, "key.create", rec.id, rec.public(now))
        return secret, rec

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        ids = [i.decode() for i in await self.redis.zrange(self.k.keys(), 0, -1)]
        found = await self._many([self.k.key(i) for i in ids])
        keys = [msgspec.json.decode(raw, type=KeyRecord) for raw in found if raw]
        return [k for k in keys if tenant is None or k.tenant == tenant]

    async def update_key(self, actor: str, key_id: str, patch: KeyPatch) -> KeyRecord:
        if patch.models is not msgspec.UNSET:
            _check_models(patch.models)

        def change(rec: KeyRecord) -> None:
            for name in ("name", "expires_at", "models", "max_priority", "limits", "budget"):
                value = getattr(patch, name)
                if value is not msgspec.UNSET:
                    setattr(rec, name, value)

        rec = await self._update(self.k.key(key_id), KeyRecord, change, f"key {key_id!r}")
        await self._changed(actor, "key.update", key_id, msgspec.to_builtins(patch))
        return rec

    async def revoke_key(self, actor: str, key_id: str) -> KeyRecord:
        now = time.time()

        def change(rec: KeyRecord) -> None:
            if rec.revoked_at is None:
                rec.revoked_at = now

        rec = await self._update(self.k.key(key_id), KeyRecord, change, f"key {key_id!r}")
        await self._changed(actor, "key.revoke", key_id, {})
        return rec

    async def rotate_key(self, actor: str, key_id: str, grace_s: float) -> tuple[str, KeyRecord]:
        """A new secret for the key; the current one stays valid for ``grace_s``."""
        if not 0 <= grace_s <= 30 * 86400:
            raise AccountError(400, "grace_s must be from 0 to 2592000 (30 days)", "invalid_grace")
        secret, sha = new_secret()
        now = time.time()
        stale: list[str] = []

        def change(rec: KeyRecord) -> None:
            if rec.status(now) != "active":
                raise AccountError(409, f"key {key_id!r} is {rec.status(now)}", "key_not_active")
            kept = [Secret(s.sha256, s.until or now + grace_s) for s in rec.secrets]
            stale.extend(s.sha256 for s in kept if s.until <= now)
            rec.secrets = [s for s in kept if s.until > now] + [Secret(sha)]
            rec.hint = secret[:12]

        rec = await self._update(self.k.key(key_id), KeyRecord, change, f"key {key_id!r}")
        await self.redis.set(self.k.secret(sha), key_id)
        for old in stale:
            await self.redis.delete(self.k.secret(old))
        for s in rec.secrets:
            if s.until:  # the lookup entry of a rotated-out secret ends with its grace
                await self.redis.expire(self.k.secret(s.sha256), max(1, math.ceil(s.until - now)))
        await self._changed(actor, "key.rotate", key_id, {"grace_s": grace_s})
        return secret, rec

    # -------------------------------------------------------- audit

    async def audit(self, actor: str, action: str, target: str, detail: Mapping[str, Any]) -> None:
        """Append an audit record (never a secret), trimming those past retention."""
        now = time.time()
        horizon_ms = int((now - self.cfg.audit_retention_days * 86400) * 1000)
        await self.redis.xadd(
            self.k.audit(),
            {
                "at": f"{now:.3f}",
                "actor": actor,
                "action": action,
                "target": target,
                "detail": orjson.dumps(detail),
            },
            minid=horizon_ms,
            approximate=True,
        )

    async def audit_log(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Audit records, newest first, older than ``after`` (an audit record's id)."""
        top = f"({after}" if after else "+"
        entries = await self.redis.xrevrange(self.k.audit(), max=top, min="-", count=limit)
        out = []
        for entry_id, fields in entries:
            f = {k.decode(): v for k, v in fields.items()}
            out.append(
                {
                    "id": entry_id.decode(),
                    "object": "audit_event",
                    "at": float(f["at"]),
                    "actor": f["actor"].decode(),
                    "action": f["action"].decode(),
                    "target": f["target"].decode(),
                    "detail": orjson.loads(f["detail"]),
                }
            )
        return out

    # -------------------------------------------------------- spend and usage

    async def spent(self, scope: str, name: str, budget: Budget) -> tuple[float, float]:
        """What the scope's budget period has spent (USD, including the estimates
        of requests still running) and when it resets (0: never)."""
        tag, reset = period_of(budget, time.time())
        raw = await self.redis.get(self.k.spend(scope, name, tag))
        return (int(raw) / NANO if raw else 0.0), reset

    async def budgets(self) -> list[tuple[str, str, Budget, float]]:
        """Every tenant and key with a budget: (scope "tenant"/"key", name, budget, the
        current period's spend in USD)."""
        now = time.time()
        found: list[tuple[str, str, Budget]] = [
            ("tenant", t.name, t.budget) for t in await self.list_tenants() if t.budget
        ]
        found += [
            ("key", k.id, k.budget)
            for k in await self.list_keys()
            if k.budget and k.status(now) == "active"
        ]
        names = [
            self.k.spend(scope[0], name, period_of(budget, now)[0]) for scope, name, budget in found
        ]
        spent = await self._many(names)
        return [
            (scope, name, budget, int(raw) / NANO if raw else 0.0)
            for (scope, name, budget), raw in zip(found, spent, strict=True)
        ]

    async def usage(
        self,
        *,
        start: str,
        end: str,
        tenant: str | None = None,
        key: str | None = None,
        model: str | None = None,
        group_by: Iterable[str] = ("day",),
    ) -> list[dict[str, Any]]:
        """Usage rows from day ``start`` to ``end`` (``YYYY-MM-DD``, UTC, inclusive),
        filtered, summed over what ``group_by`` leaves out (of day, tenant, key,
        model)."""
        groups = tuple(group_by)
        days = _days(start, end)
        found = await self._many_hashes([self.k.usage(d.replace("-", "")) for d in days])
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        for day, fields in zip(days, found, strict=True):
            for raw_field, raw_value in fields.items():
                parts = raw_field.decode(errors="replace").split(_SEP, 2)
                if len(parts) != 3:
                    continue
                f_tenant, f_key, rest = parts
                f_model, _, metric = rest.rpartition(_SEP)
                if metric not in USAGE_METRICS:
                    continue
                if (tenant is not None and f_tenant != tenant) or (
                    key is not None and f_key != key
                ):
                    continue
                if model is not None and f_model != model:
                    continue
                values = {"day": day, "tenant": f_tenant, "key": f_key, "model": f_model}
                group = tuple(values[g] for g in groups)
                row = rows.get(group)
                if row is None:
                    row = rows[group] = {g: values[g] for g in groups}
                    for name in USAGE_METRICS:
                        row[name] = 0
                row[metric] += int(raw_value)
        out = []
        for group in sorted(rows):
            row = rows[group]
            row["cost_usd"] = row.pop("cost_nusd") / NANO
            out.append(row)
        return out

    # -------------------------------------------------------- helpers

    async def _many(self, names: list[str]) -> list[bytes | None]:
        if not names:
            return []
        if self.cluster:  # (the names are on many slots)
            spread: list[bytes | None] = await cast(Any, self.redis).mget_nonatomic(names)
            return spread
        found: list[bytes | None] = await self.redis.mget(names)
        return found

    async def _many_hashes(self, names: list[str]) -> list[dict[bytes, bytes]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            found: list[dict[bytes, bytes]] = await pipe.execute()
        return found

    async def _update(self, name: str, kind: type[R], change: Callable[[R], None], what: str) -> R:
        """Read, change and write one record, retried if another writer got there first
        (the write is a compare-and-set: one key, on one Redis or a Cluster)."""
        while True:
            raw = await self.redis.get(name)
            if raw is None:
                raise AccountError(404, f"no {what}", "not_found")
            rec = msgspec.json.decode(raw, type=kind)
            change(rec)
            setattr(rec, "updated_at", time.time())  # noqa: B010 (a generic record)
            new = msgspec.json.encode(rec)
            written = await cast(Any, self.redis).eval(_SWAP, 1, name, raw, new)
            if written:
                return rec

    async def _changed(
        self, actor: str, action: str, target: str, detail: Mapping[str, Any]
    ) -> None:
        """Audit the change, then tell every ingress process to drop its cache."""
        await self.audit(actor, action, target, detail)
        await self.pubsub.publish(self.k.changed(), target)


#: Sets KEYS[1] to ARGV[2] if it still holds ARGV[1].
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def new_secret() -> tuple[str, str]:
    """A new key and its SHA-256."""
    key = "sk-llmb-" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def _metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > 32 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise AccountError(
            400,
            "metadata holds at most 32 keys of up to 64 characters, values up to 512",
            "invalid_metadata",
        )
    return dict(metadata)


def _check_models(models: list[str]) -> None:
    if len(models) > 256 or any(not 0 < len(m) <= 256 for m in models):
        raise AccountError(
            400, "models holds at most 256 names or patterns of 1 to 256 characters", "invalid"
        )


def _days(start: str, end: str) -> list[str]:
    """Each day from ``start`` to ``end`` (inclusive), at most 400."""
    try:
        first = datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC)
        last = datetime.strptime(end, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError as e:
        raise AccountError(400, "from and to are dates: YYYY-MM-DD", "invalid_date") from e
    n = (last - first).days + 1
    if not 1 <= n <= 400:
        raise AccountError(400, "from..to must span 1 to 400 days", "invalid_date")
    return [
        datetime.fromtimestamp(first.timestamp() + i * 86400, UTC).strftime("%Y-%m-%d")
        for i in range(n)
    ]

"""A job's account in the job scripts alone, on a real Redis: what admission reserves
and counts, and what every way a job ends gives back or charges."""

from __future__ import annotations

import asyncio
import time

import msgspec
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llm_broker.shared import accounts
from llm_broker.shared import messages as m
from llm_broker.shared.accounts import AccountKeys, Budget, Limits, Principal
from llm_broker.shared.config import AccountsConfig, Price
from llm_broker.shared.store import AccountLimited, BudgetExceeded, JobStore, Outcome
from llm_broker.shared.store.records import Usage
from tests.helpers import make_job
from tests.test_dispatch import WORKER, read, store_for

PRICE = Price(input_usd_per_million=1000.0, output_usd_per_million=2000.0)
#: 100 prompt tokens and 50 output tokens: 0.1 + 0.1 = $0.2.
EST = accounts.Estimate(tokens=150, cost=200_000_000)


def _acct(prefix: str, p: Principal, usage: bool = True) -> bytes:
    return accounts.account(
        p,
        AccountKeys(prefix),
        AccountsConfig(usage=usage),
        model="m",
        price=PRICE,
        est=EST,
        now=time.time(),
    )


def _job(tenant: str = "acme", **changes: object) -> m.Job:
    return msgspec.structs.replace(make_job(), tenant=tenant, **changes)


async def _spent(rclient: aioredis.Redis, prefix: str, scope: str, name: str, b: Budget) -> int:
    tag, _ = accounts.period_of(b, time.time())
    raw = await rclient.get(AccountKeys(prefix).spend(scope, name, tag))
    return int(raw or 0)


async def test_a_reservation_is_charged_the_real_cost_or_given_back(
    rclient: aioredis.Redis, prefix: str
) -> None:
    store: JobStore = store_for(rclient, prefix)
    await store.queues.ensure_group("mock")
    budget = Budget(usd=1.0, period="daily")
    p = Principal(tenant="acme", key_id="key_1", key_budget=budget, tenant_budget=budget)
    acct = _acct(prefix, p)

    # Admitted: both budgets hold the estimate.
    done = _job()
    assert await store.enqueue(done, max_depth=100, ttl_s=60, acct=acct) is None
    assert await _spent(rclient, prefix, "k", "key_1", budget) == EST.cost
    assert await _spent(rclient, prefix, "t", "acme", budget) == EST.cost
    # Completed with 10 input and 20 output tokens: $0.01 + $0.04.
    await store.register("mock", WORKER, 10, 60)
    (delivery,) = await read(store, rclient)
    await store.settle(delivery, Outcome(status=m.COMPLETED, usage=Usage(10, 20)), consumer=WORKER)
    assert await _spent(rclient, prefix, "k", "key_1", budget) == 50_000_000
    assert await _spent(rclient, prefix, "t", "acme", budget) == 50_000_000

    # Cancelled before it ran, and expired at its deadline: the estimate comes back.
    cancelled, expired = _job(), _job()
    await store.register("mock", WORKER, 0, 60)  # nothing runs
    for j in (cancelled, expired):
        assert await store.enqueue(j, max_depth=100, ttl_s=60, acct=acct) is None
    assert await _spent(rclient, prefix, "k", "key_1", budget) == 50_000_000 + 2 * EST.cost
    await store.cancel(cancelled.id, "acme", result_ttl=60)
    await store.expire(expired)
    assert await _spent(rclient, prefix, "k", "key_1", budget) == 50_000_000
    assert await _spent(rclient, prefix, "t", "acme", budget) == 50_000_000

    # The day's usage counts the three: one completed with its tokens, two errors.
    rows = await accounts.AccountStore(rclient, prefix, AccountsConfig()).usage(
        start=time.strftime("%Y-%m-%d", time.gmtime()),
        end=time.strftime("%Y-%m-%d", time.gmtime()),
        group_by=("tenant", "key", "model"),
    )
    assert rows == [
        {
            "tenant": "acme",
            "key": "key_1",
            "model": "m",
            "requests": 3,
            "input_tokens": 10,
            "output_tokens": 20,
            "errors": 2,
            "cost_usd": 0.05,
        }
    ]


async def test_a_spent_budget_refuses_with_its_reset_time(
    rclient: aioredis.Redis, prefix: str
) -> None:
    store = store_for(rclient, prefix)
    await store.queues.ensure_group("mock")
    budget = Budget(usd=0.3, period="monthly")
    acct = _acct(prefix, Principal(tenant="acme", tenant_budget=budget))
    assert await store.enqueue(_job(), max_depth=100, ttl_s=60, acct=acct) is None
    assert await store.enqueue(_job(), max_depth=100, ttl_s=60, acct=acct) is None
    refused = await store.enqueue(_job(), max_depth=100, ttl_s=60, acct=acct)
    assert isinstance(refused, BudgetExceeded) and refused.scope == "tenant"
    _, reset = accounts.period_of(budget, time.time())
    assert refused.reset_at == int(reset)
    total = Budget(usd=0.1, period="total")
    acct = _acct(prefix, Principal(tenant="other", tenant_budget=total))
    assert await store.enqueue(_job("other"), max_depth=100, ttl_s=60, acct=acct) is None
    refused = await store.enqueue(_job("other"), max_depth=100, ttl_s=60, acct=acct)
    assert isinstance(refused, BudgetExceeded) and refused.reset_at == 0


async def test_queued_and_in_flight_limits_count_until_dispatch_and_until_final(
    rclient: aioredis.Redis, prefix: str
) -> None:
    store = store_for(rclient, prefix)
    await store.queues.ensure_group("mock")
    p = Principal(tenant="acme", key_id="k", key_limits=Limits(max_queued=2, max_in_flight=3))
    acct = _acct(prefix, p, usage=False)
    waiting = [_job(), _job()]
    for j in waiting:  # no worker: both wait
        assert await store.enqueue(j, max_depth=100, ttl_s=60, acct=acct) is None
    refused = await store.enqueue(_job(), max_depth=100, ttl_s=60, acct=acct)
    assert refused == AccountLimited("key", "queued", 1.0)
    # A worker takes both: they no longer wait, but are still in flight.
    await store.register("mock", WORKER, 10, 60)
    deliveries = await read(store, rclient)
    assert len(deliveries) == 2
    assert await rclient.zcard(AccountKeys(prefix).base("k", "k") + ":queued") == 0
    assert await store.enqueue(_job(), max_depth=100, ttl_s=60, acct=acct) is None
    refused = await store.enqueue(_job(), max_depth=100, ttl_s=60, acct=acct)
    assert refused == AccountLimited("key", "in_flight", 1.0)
    for d in deliveries:
        await store.settle(d, Outcome(status=m.COMPLETED), consumer=WORKER)
    assert await store.enqueue(_job(), max_depth=100, ttl_s=60, acct=acct) is None


def test_an_account_that_only_counts_usage_has_no_checks() -> None:
    """Admission decodes an account only when it has something to check: the JSON's
    opening that has_checks looks for is what account() writes."""
    counted = _acct("p:", Principal(tenant="acme", key_id="k1"))
    assert counted and not accounts.has_checks(counted)
    assert not accounts.has_checks(b"")
    for p in (
        Principal(tenant="acme", key_id="k1", key_limits=Limits(rpm=5)),
        Principal(tenant="acme", tenant_budget=Budget(usd=1.0, period="daily")),
    ):
        assert accounts.has_checks(_acct("p:", p))
        assert accounts.has_checks(_acct("p:", p, usage=False))


def test_the_kept_account_is_the_account_of_each_request() -> None:
    """AccountJson keeps what does not depend on the estimate for the minute: each
    request still gets its own estimate, and a new day its own usage hash."""
    cfg = AccountsConfig(usage=True)
    keys = AccountKeys("p:")
    kept = accounts.AccountJson(keys, cfg)
    p = Principal(tenant="acme", key_id="k1", tenant_budget=Budget(usd=1.0, period="daily"))
    before_midnight = 86400 * 20_000 - 1.5
    for now, est in (
        (before_midnight - 30, EST),
        (before_midnight, accounts.Estimate(tokens=7, cost=11)),
        (before_midnight + 2, EST),  # the next day
    ):
        made = orjson.loads(kept(p, model="m", price=PRICE, est=est, now=now))
        fresh = orjson.loads(
            accounts.account(p, keys, cfg, model="m", price=PRICE, est=est, now=now)
        )
        # The spend key's retention may be as old as the minute: the rest is the same.
        assert 0 <= made["s"][0].pop("bx") - fresh["s"][0].pop("bx") < 60
        assert made == fresh
        assert made["e"] == est.cost and made["k"] == est.tokens
    assert made["u"] == keys.usage(accounts.day_of(before_midnight + 2))
    assert made["s"][0]["bk"].endswith(accounts.day_of(before_midnight + 2))


async def test_changes_to_one_record_made_at_once_are_all_kept(
    rclient: aioredis.Redis, prefix: str
) -> None:
    """Two admins change one tenant at the same moment (its limits, its budget):
    each write is a compare-and-set, so the one that lost the race reads again and
    neither change is lost."""
    store = accounts.AccountStore(rclient, prefix, AccountsConfig())
    limits, budget = Limits(rpm=10), Budget(usd=5.0, period="daily")
    names = [f"t{i}" for i in range(20)]
    for name in names:
        await store.create_tenant("ops", accounts.TenantInput(name=name))
    await asyncio.gather(
        *(
            change
            for name in names
            for change in (
                store.update_tenant("ops", name, accounts.TenantPatch(limits=limits)),
                store.update_tenant("ops", name, accounts.TenantPatch(budget=budget)),
            )
        )
    )
    for name in names:
        rec = await store.tenant(name)
        assert rec is not None and (rec.limits, rec.budget) == (limits, budget)


async def test_settles_sent_together_count_usage_and_fill_slots_as_one_by_one(
    rclient: aioredis.Redis, prefix: str
) -> None:
    """Deliveries settled in one call of the batch form: the day's usage counts
    each (its sums written once), each budget is charged each call's cost, and the
    slots they free take the jobs that waited, as settling them one by one would.
    A batch that fails leaves no count behind for the next call to lose."""
    store: JobStore = store_for(rclient, prefix)
    await store.queues.ensure_group("mock")
    budget = Budget(usd=100.0, period="daily")
    p = Principal(tenant="acme", key_id="key_1", key_budget=budget)
    acct = _acct(prefix, p)
    await store.register("mock", WORKER, 3, 60)
    jobs = [_job() for _ in range(5)]
    for j in jobs:
        assert await store.enqueue(j, max_depth=100, ttl_s=60, acct=acct) is None
    first = await read(store, rclient)
    assert len(first) == 3  # two wait for a slot
    usages = [Usage(10, 20), Usage(1, 2), None]
    outcomes = [Outcome(status=m.COMPLETED, usage=u) for u in usages[:2]]
    outcomes.append(Outcome(status=m.FAILED, payload=b"{}", http_status=502))
    await rclient.config_resetstat()
    made = await asyncio.gather(
        *(store.settle(d, o, consumer=WORKER) for d, o in zip(first, outcomes, strict=True))
    )
    assert made == [True, True, True]
    stats = await rclient.info("commandstats")
    assert stats["cmdstat_fcall"]["calls"] == 1
    # The usage counts (requests, input and output tokens, cost, errors) written
    # once each (one by one: 10), and the scheduler's 3 for each job the freed
    # slots took.
    assert stats["cmdstat_hincrby"]["calls"] == 5 + 2 * 3
    # The three freed slots took the two that waited.
    waited = await read(store, rclient)
    assert sorted(d.job.id for d in waited if d.job) == sorted(j.id for j in jobs[3:])
    day = time.strftime("%Y-%m-%d", time.gmtime())
    usage = accounts.AccountStore(rclient, prefix, AccountsConfig())
    expected = {"requests": 3, "input_tokens": 11, "output_tokens": 22, "errors": 1}
    rows = await usage.usage(start=day, end=day, group_by=("tenant", "key", "model"))
    assert {k: rows[0][k] for k in expected} == expected
    assert 0 < await rclient.ttl(AccountKeys(prefix).usage(accounts.day_of(time.time())))
    # (10 + 1) input and (20 + 2) output tokens at $1,000 and $2,000 a million, and
    # the two jobs still running's estimates.
    assert await _spent(rclient, prefix, "k", "key_1", budget) == 55_000_000 + 2 * EST.cost

    # A batch stopped by a call's error (a record whose account cannot be read):
    # every caller hears it; the call before it is done, counted; the next counts.
    await rclient.hset(store.keys.job(jobs[4].id), "acct", "{not json")  # type: ignore[misc]
    if waited[0].job != jobs[3]:
        waited.reverse()
    done = Outcome(status=m.COMPLETED, usage=Usage(1, 1))
    answers = await asyncio.gather(
        *(store.settle(d, done, consumer=WORKER) for d in waited), return_exceptions=True
    )
    assert all(isinstance(a, ResponseError) for a in answers), answers
    assert (await store.record(jobs[3].id)).status == "completed"  # type: ignore[union-attr]
    rows = await usage.usage(start=day, end=day, group_by=("tenant", "key", "model"))
    assert rows[0]["requests"] == 4
    last = _job()
    assert await store.enqueue(last, max_depth=100, ttl_s=60, acct=acct) is None
    (delivery,) = await read(store, rclient)
    assert await store.settle(delivery, done, consumer=WORKER) is True
    rows = await usage.usage(start=day, end=day, group_by=("tenant", "key", "model"))
    assert rows[0]["requests"] == 5

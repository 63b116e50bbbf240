"""The job-state scripts (Lua), used only by the job store.

Job state only moves forward (queued → in_progress → a final state); every
transition is one script on the job hash, so a late duplicate delivery can never
overwrite a final state. Each script names its arguments on its first lines; the
store passes them in that order, from one typed method per script.
"""

from __future__ import annotations

from llm_broker.shared.redisio import Function, Library

# Makes a job final: status, finish time and more fields, and its TTL (the
# result is kept this long). The job's Idempotency-Key never outlives it, and a
# job with a webhook gets an entry on the webhook event stream.
_FINISH = """
-- Where a provider's keys and a job's record are (shared/keys.py): on one Redis,
-- the provider's name is its keys' hash tag and a record is job:<id>; on a Cluster
-- (docs/cluster.md) the tag is the provider's code (the first four hex digits of
-- the SHA-1 of its name), and a record shares the tag of the provider that
-- admitted it, whose code begins its id.
local function provider_tag(p)
  if CLUSTER then return '{' .. string.sub(redis.sha1hex(p), 1, 4) .. '}' end
  return '{' .. p .. '}'
end

local function record(prefix, id)
  if CLUSTER then return prefix .. 'job:{' .. string.sub(id, 1, 4) .. '}' .. id end
  return prefix .. 'job:' .. id
end

-- Whether provider p's keys share the slot of job id's record (always on one Redis;
-- on a Cluster, unless the job fell back to p from the provider that admitted it:
-- then what p's keys hold of it is settled when p's dispatch or worker reaches it).
local function home(p, id)
  return not CLUSTER or provider_tag(p) == '{' .. string.sub(id, 1, 4) .. '}'
end

-- The day's usage counts (a hash per day, a field per tenant, key, model and count).
-- While a batch of settles runs (settle_many) they are summed, and written once per
-- field when it ends (usage_written); else at once. A hash gets its TTL (ttl) with
-- its first field of a (tenant, key, model): the one whose requests count starts.
local USAGE = nil  -- the batch's sums: {hash, ttl, field, n} in order of first use
local function add_usage(hash, ttl, field, n)
  -- (a count as an integer's digits: a number passed to redis.call is formatted %.14g)
  if redis.call('HINCRBY', hash, field, string.format('%d', n)) == n
      and string.sub(field, -8) == 'requests' then
    redis.call('EXPIRE', hash, ttl, 'NX')
  end
end
local function count_usage(hash, ttl, field, n)
  if not USAGE then return add_usage(hash, ttl, field, n) end
  local at = USAGE[hash .. '\0' .. field]
  if at then
    at[4] = at[4] + n
  else
    at = {hash, ttl, field, n}
    USAGE[hash .. '\0' .. field] = at
    USAGE[#USAGE + 1] = at
  end
end
local function usage_written()
  local sums = USAGE
  USAGE = nil
  for _, at in ipairs(sums) do add_usage(at[1], at[2], at[3], at[4]) end
end

-- Accounts (keys and tenants kept in Redis, docs/accounts.md): a job's account
-- is a JSON object written with its record at admission:
--   s: its scopes (the key's, the tenant's), each {n = name, b = base of its
--      keys, rpm, tpm, mif = max in flight, mq = max queued, bk = budget's spend
--      key, bl = budget (nano-USD), br = reset time, bx = spend key's TTL};
--   e: the estimated cost (nano-USD) its admission reserved on each budget;
--   k: the estimated tokens its admission counted in the tpm windows;
--   pi, po: the price of an input and an output token (nano-USD);
--   u, f, ux: the usage hash of the day, the field prefix, and the hash's TTL;
--   q: present when a scope has a max queued (its queued set counts the job while
--      it waits).
-- The job is final: its open and queued counts go, each budget is charged the
-- call's real cost instead of the estimate, the tpm windows count its real tokens,
-- and the day's usage counts it. usage: "<input> <output>" tokens, or nil/''.
local function account_close(A, id, status, usage)
  local tin, tout = 0, 0
  local known = false
  local a, b
  if usage and usage ~= '' then
    a, b = string.match(usage, '^(%d+) (%d+)$')
    if a then tin, tout, known = tonumber(a), tonumber(b), true end
  end
  local cost = math.floor(tin * A.pi + tout * A.po + 0.5)
  for _, s in ipairs(A.s) do
    if s.mif > 0 then redis.call('ZREM', s.b .. ':open', id) end
    if s.mq > 0 then redis.call('ZREM', s.b .. ':queued', id) end
    if s.bk and A.e ~= cost then redis.call('INCRBY', s.bk, cost - A.e) end
    if s.tpm > 0 and known and A.k ~= tin + tout then
      local counted = id .. ':' .. A.k
      local at = redis.call('ZSCORE', s.b .. ':tok', counted)
      if at then
        redis.call('ZREM', s.b .. ':tok', counted)
        redis.call('ZADD', s.b .. ':tok', at, id .. ':' .. (tin + tout))
        redis.call('INCRBY', s.b .. ':sum', tin + tout - A.k)
      end
    end
  end
  if A.u then
    local f = A.f
    count_usage(A.u, A.ux, f .. 'requests', 1)
    if tin > 0 then count_usage(A.u, A.ux, f .. 'input_tokens', tin) end
    if tout > 0 then count_usage(A.u, A.ux, f .. 'output_tokens', tout) end
    if cost > 0 then count_usage(A.u, A.ux, f .. 'cost_nusd', cost) end
    if status ~= 'completed' then count_usage(A.u, A.ux, f .. 'errors', 1) end
  end
end

-- Makes a job final: status, finish time and more fields, and its TTL (the
-- result is kept this long). The job's Idempotency-Key never outlives it, a job
-- with a webhook gets an entry on the webhook event stream, a batch's line one on
-- its batch's stream, and its account is closed (usage: the call's tokens,
-- "<input> <output>", or nil).
-- more: the record's idem_key, webhook_url, acct and batch, read by the caller
-- (finish reads them).
local function finish_read(job, events, id, status, now, ttl, usage, more, ...)
  redis.call('HSET', job, 'status', status, 'completed_at', now, ...)
  redis.call('EXPIRE', job, ttl)
  if more[1] then
    local left = redis.call('TTL', more[1])
    if left > tonumber(ttl) then redis.call('EXPIRE', more[1], ttl) end
  end
  if more[2] then
    redis.call('XADD', events, '*', 'i', id)
  end
  if more[3] and more[3] ~= '' then account_close(cjson.decode(more[3]), id, status, usage) end
  -- A batch's line: its batch hears of it on the batch's stream of finished lines.
  if more[4] then redis.call('XADD', more[4], '*', 'i', id) end
end

local function finish(job, events, id, status, now, ttl, usage, ...)
  local more = redis.call('HMGET', job, 'idem_key', 'webhook_url', 'acct', 'batch')
  finish_read(job, events, id, status, now, ttl, usage, more, ...)
end
"""


# The scheduler (docs/scheduling.md). Jobs wait in one list per (provider, class,
# tenant) until a dispatch moves them to the provider's stream, which workers
# read with the consumer group; the stream then holds at most the capacity that
# the provider's live workers registered. Dispatch happens when a job arrives,
# when a delivery settles or falls back, and on every worker's registration, and
# takes, for each free slot: a lower class owed its minimum share first, else the
# highest class with work; within a class, deficit round robin over its tenants,
# weighted, skipping tenants at their in-flight quota. Key names match
# shared/keys.py.
_SCHED = """
local CLASSES = {'interactive', 'async', 'batch'}
local ZERO = {['0'] = 0}
local MAX_VISITS, MAX_DROPS = 256, 256

-- A provider's scheduler keys, each built when first used (most calls need few).
local PER_PROVIDER = {
  stream = 'q:',         -- the stream workers read
  state = 'sched:',      -- hash: share:<class>, credit:<class>, entries
  capacity = 'cap:',     -- string: slots of live workers (TTL)
  workers = 'workers:',  -- hash: consumer -> "slots expiry"
  conf = 'tc:',          -- hash: class:tenant -> "weight in-flight quotas"
  queued = 'tq:',        -- hash: tenant -> jobs waiting here
}
local SHARED = {queued_all = 'tq', events = 'wh:events'}
local KEYS_OF = {__index = function(S, name)
  local key
  if PER_PROVIDER[name] then
    key = S.prefix .. PER_PROVIDER[name] .. S.tag
  elseif CLUSTER and name == 'events' then
    key = S.prefix .. 'wh:events:' .. S.tag  -- (one event stream per provider)
  else
    key = S.prefix .. SHARED[name]
  end
  rawset(S, name, key)
  return key
end}

-- A provider's keys are the same on every call: each S is made once and kept for the
-- library's life, with the keys its calls built (at most MAX_SCHEDS kept: a config
-- names a few providers; past that they are made again).
local SCHEDS, SCHEDS_MADE, MAX_SCHEDS = {}, 0, 1024
local function sched(prefix, p)
  local of = SCHEDS[prefix]
  local S = of and of[p]
  if S then return S end
  if SCHEDS_MADE >= MAX_SCHEDS then
    SCHEDS, SCHEDS_MADE, of = {}, 0, nil
  end
  if not of then
    of = {}
    SCHEDS[prefix] = of
  end
  S = setmetatable({prefix = prefix, tag = provider_tag(p)}, KEYS_OF)
  of[p] = S
  SCHEDS_MADE = SCHEDS_MADE + 1
  return S
end
local function ring(S, c) return S.prefix .. 'ring:' .. S.tag .. ':' .. c end
local function deficits(S, c) return S.prefix .. 'drr:' .. S.tag .. ':' .. c end
local function index(S, c) return S.prefix .. 'wait:' .. S.tag .. ':' .. c end
local function waiting(S, c, t) return S.prefix .. 'w:' .. S.tag .. ':' .. c .. ':' .. t end
local function flight(S, t) return S.prefix .. 'fl:' .. S.tag .. ':' .. t end
local function flight_all(S, t) return S.prefix .. 'fla:' .. t end

-- A waiting job leaves the counts (once: the class index says whether it is in).
-- Returns whether it was counted.
local function uncount(S, c, t, id)
  if redis.call('ZREM', index(S, c), id) == 0 then return false end
  if redis.call('HINCRBY', S.queued, t, -1) <= 0 then redis.call('HDEL', S.queued, t) end
  if CLUSTER then return true end  -- (no count across providers: see docs/cluster.md)
  if redis.call('HINCRBY', S.queued_all, t, -1) <= 0 then redis.call('HDEL', S.queued_all, t) end
  return true
end

-- A job joins its tenant's waiting list (at the front when it waited before),
-- unless it is there already; the provider's state counts list entries (live or
-- not), which bounds what the lists hold. keep: leave the tenant's settings as
-- its admission set them, if any. Returns false if the job was there already.
-- deadline: the job's (on a Cluster the entry carries it: dispatch reads no record).
local function push(S, c, t, id, created, packed, conf, front, keep, deadline)
  if redis.call('ZADD', index(S, c), 'NX', created, id) == 0 then return false end
  local list = waiting(S, c, t)
  local entry = id .. ' ' .. packed
  if CLUSTER then entry = id .. ' ' .. deadline .. ' ' .. packed end
  local n
  if front then
    n = redis.call('LPUSH', list, entry)
  else
    n = redis.call('RPUSH', list, entry)
  end
  if n == 1 then redis.call('RPUSH', ring(S, c), t) end
  if keep then
    redis.call('HSETNX', S.conf, c .. ':' .. t, conf)
  else
    redis.call('HSET', S.conf, c .. ':' .. t, conf)
  end
  redis.call('HINCRBY', S.queued, t, 1)
  if not CLUSTER then redis.call('HINCRBY', S.queued_all, t, 1) end
  redis.call('HINCRBY', S.state, 'entries', 1)
  return true
end

local function conf_of(S, c, t)
  local raw = redis.call('HGET', S.conf, c .. ':' .. t) or '1 0 0'
  local w, fq, fqa = string.match(raw, '^(%S+) (%S+) (%S+)$')
  return tonumber(w) or 1, tonumber(fq) or 0, tonumber(fqa) or 0
end

local function at_quota(key, quota, now)
  if quota <= 0 then return false end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key) >= quota
end

local function live(job, now)
  local st = redis.call('HMGET', job, 'status', 'deadline', 'acct')
  -- (a job that falls back from another provider is in_progress)
  local running = st[1] == 'queued' or st[1] == 'in_progress'
  return running, running and tonumber(st[2]) > now, tonumber(st[2]), st[3]
end

-- Pops the head of a tenant's list. Returns {id, packed job, deadline} for a job
-- to run, false for one that must not run (final already, or its deadline
-- passed: made expired here, without an upstream call), nil for an empty list;
-- and what is left in the list.
-- On a Cluster: "<id> <deadline> <packed job>", and a job cancelled or expired
-- while it waited has left its class's index already (a job that fell back from
-- another provider has its record on another slot, which dispatch cannot read).
-- One whose deadline passed goes to the stream all the same: its start marks it
-- expired, without an upstream call.
local function pop_entry(S, c, t)
  local list = waiting(S, c, t)
  local e = redis.call('LPOP', list)
  local left = redis.call('LLEN', list)
  if not e then return nil, left end
  redis.call('HINCRBY', S.state, 'entries', -1)
  local a = string.find(e, ' ', 1, true)
  local b = string.find(e, ' ', a + 1, true)
  local id = string.sub(e, 1, a - 1)
  if not uncount(S, c, t, id) then return false, left end
  return {id, string.sub(e, b + 1), tonumber(string.sub(e, a + 1, b - 1))}, left
end

local function pop(S, c, t, now)
  if CLUSTER then return pop_entry(S, c, t) end
  local list = waiting(S, c, t)
  local e = redis.call('LPOP', list)
  local left = redis.call('LLEN', list)
  if not e then return nil, left end
  redis.call('HINCRBY', S.state, 'entries', -1)
  local sp = string.find(e, ' ', 1, true)
  local id = string.sub(e, 1, sp - 1)
  uncount(S, c, t, id)
  local job = record(S.prefix, id)
  local running, runnable, deadline, acct = live(job, now)
  if runnable then
    -- A job its account counts as queued no longer waits (see finish's header).
    if acct and string.find(acct, '"q":', 1, true) then
      for _, s in ipairs(cjson.decode(acct).s) do
        if s.mq > 0 then redis.call('ZREM', s.b .. ':queued', id) end
      end
    end
    return {id, string.sub(e, sp + 1), deadline}, left
  end
  if running then
    -- The record was kept until its deadline plus the result TTL.
    finish(job, S.events, id, 'expired', now, math.max(60, redis.call('TTL', job)), nil,
           'http_status', 504)
  end
  return false, left
end

-- Whether the head of a tenant's list is a job that must not run (or none).
local function head_dead(S, c, t, now)
  local e = redis.call('LINDEX', waiting(S, c, t), 0)
  if not e then return true end
  local id = string.sub(e, 1, string.find(e, ' ', 1, true) - 1)
  if CLUSTER then return not redis.call('ZSCORE', index(S, c), id) end
  local _, runnable = live(record(S.prefix, id), now)
  return not runnable
end

-- The tenant at the head of class c's round has nothing left there: it leaves,
-- and keeps no credit.
local function leave(S, c, t)
  redis.call('LPOP', ring(S, c))
  redis.call('HDEL', deficits(S, c), t)
  redis.call('HDEL', S.conf, c .. ':' .. t)
end

-- The next job of class c to run, by deficit round robin over its tenants
-- (a visit adds the tenant's weight, at least 1, to its deficit; each job sent
-- costs 1): returns id, tenant, packed job, deadline, in-flight quotas; nil if
-- none can go now. A tenant at an in-flight quota is passed over (its jobs that
-- must not run are still dropped); each tenant is visited at most once a call
-- while none can go, and at most MAX_VISITS in all.
local function take(S, c, now, budget)
  local rk, dk = ring(S, c), deficits(S, c)
  local visits = math.min(MAX_VISITS, redis.call('LLEN', rk))
  while visits > 0 and budget.drops > 0 do
    local t = redis.call('LINDEX', rk, 0)
    if not t then return nil end
    local w, fq, fqa = conf_of(S, c, t)
    local blocked = (fq > 0 and at_quota(flight(S, t), fq, now))
      or (fqa > 0 and at_quota(flight_all(S, t), fqa, now))
    if blocked and not head_dead(S, c, t, now) then
      visits = visits - 1
      redis.call('LMOVE', rk, rk, 'LEFT', 'RIGHT')
    else
      local got, left = pop(S, c, t, now)
      if not got then
        if got == false then budget.drops = budget.drops - 1 end
        if left == 0 then
          leave(S, c, t)
          visits = visits - 1
        end
      else
        local d = tonumber(redis.call('HGET', dk, t) or '0')
        -- (a hair under 1 counts as 1: sums of fractions round down)
        if d < 0.999999 then d = d + w end
        d = d - 1
        if left == 0 then
          leave(S, c, t)
        elseif d < 0.999999 then
          redis.call('HSET', dk, t, d)
          redis.call('LMOVE', rk, rk, 'LEFT', 'RIGHT')
        else
          redis.call('HSET', dk, t, d)
        end
        return got[1], t, got[2], got[3], fq, fqa
      end
    end
  end
  return nil
end

-- A job goes to the provider's stream; under an in-flight quota its tenant's
-- in-flight set holds it until it settles (or its deadline passes).
local function hold(key, id, deadline, now)
  local keep = math.ceil(deadline - now) + 60
  redis.call('ZADD', key, deadline, id)
  redis.call('EXPIRE', key, keep, 'GT')
  redis.call('EXPIRE', key, keep, 'NX')
end

local function send(S, t, id, packed, deadline, fq, fqa, now)
  redis.call('XADD', S.stream, '*', 'j', packed)

  if fq > 0 then hold(flight(S, t), id, deadline, now) end
  if fqa > 0 then hold(flight_all(S, t), id, deadline, now) end
end

-- Fills the free slots (the live workers' capacity less what the stream holds)
-- with waiting jobs; returns how many moved.
local function dispatch(S, now)
  if tonumber(redis.call('HGET', S.state, 'entries') or '0') <= 0 then return 0 end
  local free = tonumber(redis.call('GET', S.capacity) or '0') - redis.call('XLEN', S.stream)
  if free <= 0 then return 0 end
  local active, spent = {}, {}
  for i, c in ipairs(CLASSES) do active[i] = redis.call('LLEN', ring(S, c)) > 0 end
  local st = redis.call('HMGET', S.state, 'share:async', 'share:batch',
                        'credit:async', 'credit:batch')
  local share = {0, tonumber(st[1]) or 0, tonumber(st[2]) or 0}
  local credit = {0, tonumber(st[3]) or 0, tonumber(st[4]) or 0}
  local budget = {drops = MAX_DROPS}
  -- The next job of class i. Only take changes a class's ring, so only that
  -- ring is looked at again; a class in which no job could go is spent for
  -- the rest of this call.
  local function try(i)
    local id, t, packed, deadline, fq, fqa = take(S, CLASSES[i], now, budget)
    active[i] = redis.call('LLEN', ring(S, CLASSES[i])) > 0
    spent[i] = not id
    return id, t, packed, deadline, fq, fqa
  end
  local moved = 0
  while moved < free do
    local id, t, packed, deadline, fq, fqa
    -- A lower class owed its minimum share goes first.
    for i = 2, 3 do
      -- (a hair under 1 counts: ten additions of 0.1 make 0.9999…)
      if not id and active[i] and not spent[i] and credit[i] >= 0.999999 then
        id, t, packed, deadline, fq, fqa = try(i)
        if id then credit[i] = math.max(0, credit[i] - 1) end
      end
    end
    for i = 1, 3 do
      if not id and active[i] and not spent[i] then
        id, t, packed, deadline, fq, fqa = try(i)
      end
    end
    if not id then break end
    send(S, t, id, packed, deadline, fq, fqa, now)
    moved = moved + 1
    -- Credit accrues to a lower class only while a higher class has work too.
    local above = active[1]
    for i = 2, 3 do
      if active[i] and above then
        credit[i] = math.min(credit[i] + share[i], 1 + share[i])
      else
        credit[i] = 0
      end
      above = above or active[i]
    end
  end
  redis.call('HSET', S.state, 'credit:async', credit[2], 'credit:batch', credit[3])
  return moved
end

-- A settled (or moved) job no longer counts against its tenant's in-flight quotas
-- (held: 'p' if it counted on the provider, 'a' overall; nil: both may).
local function landed(S, t, id, held)
  if not held or string.find(held, 'p', 1, true) then redis.call('ZREM', flight(S, t), id) end
  if CLUSTER then return end  -- (no quota across providers there: docs/cluster.md)
  if not held or string.find(held, 'a', 1, true) then redis.call('ZREM', flight_all(S, t), id) end
end

-- settle's arguments (JobStore.settle):
--   group, entry, id, status, now, field, payload, http_status, ttl, maxlen, history,
--   prefix, provider, tenant, estimate, usage, held, started, then the reply (none:
--   no reply) as records.reply_args gives it: kind, status, its usage or
--   Retry-After ('' none), and its data unless the data is the payload.
-- usage: the call's tokens, "<input> <output>" ('' unknown).
-- held: the tenant's in-flight quotas the job counted in ('p' provider, 'a' overall).
-- started: when the call began, if it ran without the start function (a synchronous
-- call's first delivery): recorded here, and the attempt counted.

-- The field of a reply's usage (a result) or Retry-After (a failure).
local REPLY_EXTRA = {r = 'u', e = 'ra'}

-- Makes the job final (unless it already is, or status is ''), then sends the reply
-- to the waiting ingress process (if any), in the fields records.reply_fields names.
-- Returns 1 if this call made the job final.
local function settle_record(job, replies, events, ARGV)
  local id, status, now, field, payload, http_status, ttl, maxlen, history = unpack(ARGV, 3, 11)
  local usage, started = ARGV[16], ARGV[18]
  local made = 0
  if status ~= '' then
    -- One read of what the record holds, one write of what changes.
    local st = redis.call('HMGET', job, 'status', 'attempts', 'idem_key', 'webhook_url', 'acct',
                          'batch')
    if st[1] == 'queued' or st[1] == 'in_progress' then
      local more = {st[3], st[4], st[5], st[6]}
      local set = {field, payload, 'http_status', http_status}
      if history ~= '' then
        set[5], set[6] = 'history', history
      end
      if started ~= '' then
        local n = #set
        set[n + 1], set[n + 2] = 'attempts', (tonumber(st[2]) or 0) + 1
        set[n + 3], set[n + 4] = 'started_at', started
      end
      finish_read(job, events, id, status, now, ttl, usage, more, unpack(set))
      made = 1
    end
  end
  local kind = ARGV[19]
  if kind then
    local s, extra, data = ARGV[20], ARGV[21], ARGV[22] or payload
    if extra == '' then
      redis.call('XADD', replies, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '*', 'i', id, 'k', kind,
                 's', s, 'd', data)
    else
      redis.call('XADD', replies, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '*', 'i', id, 'k', kind,
                 's', s, REPLY_EXTRA[kind], extra, 'd', data)
    end
  end
  return made
end

-- Acknowledges and deletes the entry, so the stream holds only work not yet done;
-- the slot is free, and the next waiting job goes.
local function settle_queue(queue, ARGV, later)
  local group, entry, id = ARGV[1], ARGV[2], ARGV[3]
  local now, prefix, provider, tenant, estimate, usage, held = ARGV[5], unpack(ARGV, 12, 17)
  local S = sched(prefix, provider)
  if later and (tenant == '' or held == '') then
    -- (nothing hangs on whether this entry was acknowledged still: it goes with
    -- the batch's others, see settle_many)
    local key = queue .. '\0' .. group
    local entries = later.entries[key]
    if not entries then
      entries = {queue, group}
      later.entries[key] = entries
      later.entries[#later.entries + 1] = entries
    end
    entries[#entries + 1] = entry
  else
    local acked = redis.call('XACK', queue, group, entry)
    redis.call('XDEL', queue, entry)
    -- (A late duplicate delivery, whose entry was settled already, leaves the
    -- tenant's in-flight count alone.)
    if tenant ~= '' and acked == 1 and held ~= '' then landed(S, tenant, id, held) end
  end
  -- The tenant's tpm windows count the call's real tokens from now on, not the
  -- estimate its admission counted (once: the estimate's member goes).
  local used = -1
  if tenant ~= '' and estimate ~= '0' and usage ~= '' then
    local a, b = string.match(usage, '^(%d+) (%d+)$')
    if a then used = tonumber(a) + tonumber(b) end
  end
  if used >= 0 and used ~= tonumber(estimate) then
    local windows = {prefix .. 'trl:' .. S.tag .. ':' .. tenant}
    if not CLUSTER then windows[2] = prefix .. 'trla:' .. tenant end
    for _, base in ipairs(windows) do
      local counted = id .. ':' .. estimate
      local at = redis.call('ZSCORE', base .. ':tok', counted)
      if at then
        redis.call('ZREM', base .. ':tok', counted)
        redis.call('ZADD', base .. ':tok', at, id .. ':' .. used)
        redis.call('INCRBY', base .. ':sum', used - tonumber(estimate))
      end
    end
  end
  if later then later.dispatch[S] = tonumber(now) else dispatch(S, tonumber(now)) end
end

-- Whether consumer holds the queue's entry (a stalled worker's entry may have been
-- reclaimed by another).
local function holds(queue, group, entry, consumer)
  local pending = redis.call('XPENDING', queue, group, entry, entry, 1)
  return pending[1] ~= nil and pending[1][2] == consumer
end

-- A request's tenant quotas in a rate window: requests and estimated tokens.
-- Returns the seconds until it would fit, or nil when it fits.
local function over_rate(base, rpm, tpm, cost, now, win)
  if rpm > 0 then
    local req = base .. ':req'
    redis.call('ZREMRANGEBYSCORE', req, '-inf', now - win)
    if redis.call('ZCARD', req) >= rpm then
      local oldest = redis.call('ZRANGE', req, 0, 0, 'WITHSCORES')
      return tonumber(oldest[2]) + win - now
    end
  end
  if tpm > 0 then
    local tok, sum = base .. ':tok', base .. ':sum'
    local old = redis.call('ZRANGEBYSCORE', tok, '-inf', now - win)
    if #old > 0 then
      local freed = 0
      for _, member in ipairs(old) do
        freed = freed + tonumber(string.match(member, ':(%d+)$'))
      end
      redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - win)
      redis.call('DECRBY', sum, freed)
    end
    local used = tonumber(redis.call('GET', sum) or '0')
    if used > 0 and used + cost > tpm then
      local oldest = redis.call('ZRANGE', tok, 0, 0, 'WITHSCORES')
      if oldest[2] then return tonumber(oldest[2]) + win - now end
      return win
    end
  end
  return nil
end

local function add_rate(base, rpm, tpm, cost, now, win, id)
  local keep = math.ceil(win) + 1
  if rpm > 0 then
    redis.call('ZADD', base .. ':req', now, id)
    redis.call('EXPIRE', base .. ':req', keep)
  end
  if tpm > 0 then
    redis.call('ZADD', base .. ':tok', now, id .. ':' .. cost)
    redis.call('INCRBY', base .. ':sum', cost)
    redis.call('EXPIRE', base .. ':tok', keep)
    redis.call('EXPIRE', base .. ':sum', keep)
  end
end

-- An account's checks (see finish's header for A): per scope, its rates, its open
-- and queued requests, then its budget. Returns nil when the request may be
-- admitted, else the refusal: {'account_limited', scope, what, retry_after} or
-- {'budget_exceeded', scope, reset time}.
local function account_refuse(A, now)
  for _, s in ipairs(A.s) do
    if s.rpm > 0 or s.tpm > 0 then
      local wait = over_rate(s.b, s.rpm, s.tpm, A.k, now, 60)
      if wait then return {'account_limited', s.n, 'rate', tostring(wait)} end
    end
    if at_quota(s.b .. ':open', s.mif, now) then
      return {'account_limited', s.n, 'in_flight', '1'}
    end
    if at_quota(s.b .. ':queued', s.mq, now) then
      return {'account_limited', s.n, 'queued', '1'}
    end
    if s.bk and tonumber(redis.call('GET', s.bk) or '0') >= s.bl then
      return {'budget_exceeded', s.n, tostring(s.br)}
    end
  end
  return nil
end

-- The admitted request enters its account: rates, open set, budget reservation.
local function account_enter(A, id, now, deadline)
  for _, s in ipairs(A.s) do
    if s.rpm > 0 or s.tpm > 0 then add_rate(s.b, s.rpm, s.tpm, A.k, now, 60, id) end
    if s.mif > 0 then hold(s.b .. ':open', id, deadline, now) end
    if s.bk and A.e > 0 then
      redis.call('INCRBY', s.bk, A.e)
      if s.bx > 0 then redis.call('EXPIRE', s.bk, s.bx, 'NX') end
    end
  end
end

-- The request waits (it was not sent at once): the scopes with a max queued count it
-- until dispatch sends it (pop).
local function account_wait(A, id, deadline, now)
  for _, s in ipairs(A.s) do
    if s.mq > 0 then hold(s.b .. ':queued', id, deadline, now) end
  end
end

-- A provider's depth as admission reads it: the jobs waiting (its entries count)
-- and in its stream, and its capacity (read when first needed). In a batch of
-- admissions (enqueue_many: kept, by provider) it is read once and kept up to date
-- while the batch's jobs go straight to the stream; a job that waits (dispatch
-- then runs) makes the next read it again.
local function depth_of(S, kept)
  local d = kept and kept[S]
  if d then return d end
  d = {waiting = tonumber(redis.call('HGET', S.state, 'entries') or '0'),
       streamed = redis.call('XLEN', S.stream)}
  if kept then kept[S] = d end
  return d
end

local function capacity_of(S, d)
  d.cap = d.cap or tonumber(redis.call('GET', S.capacity) or '0')
  return d.cap
end

-- Admission's checks, before anything is written: the provider's depth, then
-- the tenant's queued-jobs quotas, then its rate quotas (on this provider, then
-- overall). Returns nil when the job may be admitted, else the refusal.
local function refuse(S, q)
  local d = depth_of(S, q.kept)
  q.depth = d
  if d.streamed + d.waiting >= q.max_depth then return {'full'} end
  local t = q.tenant
  if q.mq > 0 and tonumber(redis.call('HGET', S.queued, t) or '0') >= q.mq then
    return {'tenant_queue_full', 'provider'}
  end
  if q.mqa > 0 and tonumber(redis.call('HGET', S.queued_all, t) or '0') >= q.mqa then
    return {'tenant_queue_full', 'all'}
  end
  if q.rpm > 0 or q.tpm > 0 then
    local wait = over_rate(S.prefix .. 'trl:' .. S.tag .. ':' .. t, q.rpm, q.tpm, q.cost, q.now, 60)
    if wait then return {'tenant_rate_limited', 'provider', tostring(wait)} end
  end
  if q.rpma > 0 or q.tpma > 0 then
    local wait = over_rate(S.prefix .. 'trla:' .. t, q.rpma, q.tpma, q.cost, q.now, 60)
    if wait then return {'tenant_rate_limited', 'all', tostring(wait)} end
  end
  if q.acct then return account_refuse(q.acct, q.now) end
  return nil
end

-- The admitted job joins the rate windows, then goes straight to the stream when
-- nothing waits on the provider, a slot is free and its tenant is under its
-- in-flight quotas (what dispatch would choose, at a fraction of its cost);
-- else it joins its waiting list and dispatch runs.
local function enter(S, q, id, created, packed)
  local t = q.tenant
  if q.acct then account_enter(q.acct, id, q.now, q.deadline) end
  if q.rpm > 0 or q.tpm > 0 then
    add_rate(S.prefix .. 'trl:' .. S.tag .. ':' .. t, q.rpm, q.tpm, q.cost, q.now, 60, id)
  end
  if q.rpma > 0 or q.tpma > 0 then
    add_rate(S.prefix .. 'trla:' .. t, q.rpma, q.tpma, q.cost, q.now, 60, id)
  end
  local d = q.depth
  if d.waiting <= 0 and capacity_of(S, d) > d.streamed
      and not (q.fq > 0 and at_quota(flight(S, t), q.fq, q.now))
      and not (q.fqa > 0 and at_quota(flight_all(S, t), q.fqa, q.now)) then
    send(S, t, id, packed, q.deadline, q.fq, q.fqa, q.now)
    d.streamed = d.streamed + 1
    return
  end
  if q.acct and q.acct.q then account_wait(q.acct, id, q.deadline, q.now) end
  push(S, q.class, t, id, created, packed, q.conf, false, false, q.deadline)
  dispatch(S, q.now)
  if q.kept then q.kept[S] = nil end
end

-- A tenant's weight and quotas on a provider as admission gets them (one argument,
-- JobStore._tenant_args): "w fq fqa mq mqa rpm tpm rpma tpma" (its weight, its
-- in-flight quotas there and overall, queued quotas, rpm and tpm there, then
-- overall). A config has few such strings: each is parsed once and kept for the
-- library's life (at most MAX_QUOTAS kept), as a metatable an admission's q reads
-- them through.
local QUOTAS, QUOTAS_MADE, MAX_QUOTAS = {}, 0, 1024
local function quotas(raw)
  local meta = QUOTAS[raw]
  if meta then return meta end
  local w, fq, fqa, mq, mqa, rpm, tpm, rpma, tpma = string.match(raw,
    '^(%S+) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+)$')
  if not w then return error('malformed quotas: ' .. raw) end
  if QUOTAS_MADE >= MAX_QUOTAS then QUOTAS, QUOTAS_MADE = {}, 0 end
  meta = {__index = {
    conf = w .. ' ' .. fq .. ' ' .. fqa, fq = tonumber(fq), fqa = tonumber(fqa),
    mq = tonumber(mq), mqa = tonumber(mqa), rpm = tonumber(rpm), tpm = tonumber(tpm),
    rpma = tonumber(rpma), tpma = tonumber(tpma),
  }}
  QUOTAS[raw] = meta
  QUOTAS_MADE = QUOTAS_MADE + 1
  return meta
end

-- The admission arguments from position i of ARGV (JobStore._admission): prefix,
-- provider, class, the tenant's quotas (see quotas), estimated tokens, now, max
-- depth, deadline, the job's account ('' for none: see finish), '1' when admission
-- checks it ('' when it only counts usage, which finish does), then the record's
-- model and stream flag (see admitted).
local function admission(ARGV, i, tenant)
  local prefix, provider, class, raw, cost, now, max_depth, deadline, acct, checks =
    unpack(ARGV, i, i + 9)
  local q = setmetatable({
    tenant = tenant, class = class, cost = ZERO[cost] or tonumber(cost),
    now = tonumber(now), max_depth = tonumber(max_depth), deadline = tonumber(deadline),
  }, quotas(raw))
  if checks == '1' then q.acct = cjson.decode(acct) end
  return sched(prefix, provider), q
end

-- The admitted job's record (records.admission_fields names the same fields), from
-- the admission arguments at position i of ARGV, with the record's other
-- field/value pairs after them; it lives ttl seconds unless it finishes.
local function admitted(job, ttl, tenant, created, ARGV, i)
  local fields = {'tenant', tenant, 'priority', ARGV[i + 2], 'status', 'queued',
    'model', ARGV[i + 10], 'provider', ARGV[i + 1], 'created_at', created,
    'deadline', ARGV[i + 7], 'attempts', '0', 'stream', ARGV[i + 11]}
  local acct = ARGV[i + 8]
  if acct ~= '' then
    fields[#fields + 1] = 'acct'
    fields[#fields + 1] = acct
  end
  for j = i + 12, #ARGV do fields[#fields + 1] = ARGV[j] end
  redis.call('HSET', job, unpack(fields))
  redis.call('EXPIRE', job, ttl)
end
"""

# What a synchronous call's two functions do (each a function of the library's, and
# each also made on several calls at once: see each_call).
_CALLS = """
-- A synchronous call's admission (see the scheduler above for its arguments):
-- the job record, then its waiting list. Returns {'ok'} or the refusal.
local function enqueue_one(job, A, kept)
  local packed, ttl, id, tenant, created = unpack(A, 1, 5)
  -- A[6…17]: the admission arguments
  local S, q = admission(A, 6, tenant)
  q.kept = kept  -- (a batch's: see depth_of)
  local no = refuse(S, q)
  if no then return no end
  admitted(job, ttl, tenant, created, A, 6)
  enter(S, q, id, tonumber(created), packed)
  return {'ok'}
end

-- A delivery's close (settle_record, then settle_queue); 1 if it made the job final.
-- later: see settle_many.
local function settle_one(job, queue, replies, events, A, later)
  local made = settle_record(job, replies, events, A)
  settle_queue(queue, A, later)
  return made
end

-- Calls of one function made at once (the batch form of enqueue and settle: the
-- batcher's call_merged, shared/redisio.py): KEYS holds each call's keys, per call
-- of them, and ARGV each call's argument count, then its arguments. one(k, A) makes
-- a call, its keys from KEYS[k + 1], its arguments A. Returns each call's answer,
-- in order; the calls run one after another, as separate calls of the function would.
local function each_call(KEYS, ARGV, per, one)
  local answers, p = {}, 1
  for i = 1, #KEYS / per do
    local n = tonumber(ARGV[p])
    answers[i] = one((i - 1) * per, {unpack(ARGV, p + 1, p + n)})
    p = p + n + 1
  end
  return answers
end

-- Deliveries closed in one call (each_call): as one after another, but what can
-- wait for the last is done once: a queue's entries that count in no tenant's
-- in-flight quota are acknowledged and deleted together, its free slots are filled
-- (dispatch) once, and the day's usage counts are written once per field, with the
-- calls' sums.
local function settle_many(KEYS, ARGV)
  local later = {entries = {}, dispatch = {}}
  USAGE = {}
  local function done()
    usage_written()
    for _, e in ipairs(later.entries) do
      redis.call('XACK', e[1], e[2], unpack(e, 3))
      redis.call('XDEL', e[1], unpack(e, 3))
    end
    for S, now in pairs(later.dispatch) do dispatch(S, now) end
  end
  local ok, made = pcall(each_call, KEYS, ARGV, 4, function(k, A)
    return settle_one(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], A, later)
  end)
  if not ok then
    -- A call failed (a defect): what the calls before it did stays done, as it
    -- would have one by one, counts included, and the next call counts at once.
    pcall(done)  -- (which clears the sums first)
    return error(made)
  end
  done()
  return made
end
"""

_ENQUEUE = """
return enqueue_one(KEYS[1], ARGV)
"""

_ENQUEUE_MANY = """
local kept = {}
return each_call(KEYS, ARGV, 1, function(k, A) return enqueue_one(KEYS[k + 1], A, kept) end)
"""

# An async submission: the Idempotency-Key check, admission, the job record,
# its waiting list and the tenant's job index in one step. The idempotency key
# is unused unless use_idem is '1'; its value is "<request hash> <job id>".
# Returns {'ok'}, a refusal (see refuse), {'dup', idempotency value, the job's
# fields} or {'conflict'} (the key's job is gone or another tenant's).
_SUBMIT = """
local job, idem, index = KEYS[1], KEYS[2], KEYS[3]
local packed, ttl, use_idem, idem_value, idem_ttl, id, score, key_prefix, tenant =
  unpack(ARGV, 1, 9)
-- ARGV[10…21]: the admission arguments; ARGV[22…]: the record's other field/value pairs
if use_idem == '1' then
  local seen = redis.call('GET', idem)
  if seen then
    local seen_id = string.sub(seen, string.find(seen, ' ', 1, true) + 1)
    -- another tenant's job is never returned
    local seen_job = record(key_prefix, seen_id)
    if redis.call('HGET', seen_job, 'tenant') ~= tenant then return {'conflict'} end
    return {'dup', seen, redis.call('HGETALL', seen_job)}
  end
end
local S, q = admission(ARGV, 10, tenant)
local no = refuse(S, q)
if no then return no end
admitted(job, ttl, tenant, score, ARGV, 10)
if use_idem == '1' then redis.call('SET', idem, idem_value, 'EX', idem_ttl) end
redis.call('ZADD', index, score, id)
-- Bounded upkeep of the index: the oldest few ids whose records expired go.
for _, old in ipairs(redis.call('ZRANGE', index, 0, 3)) do
  if redis.call('EXISTS', record(key_prefix, old)) == 0 then redis.call('ZREM', index, old) end
end
if redis.call('TTL', index) < tonumber(ttl) then redis.call('EXPIRE', index, ttl) end
enter(S, q, id, tonumber(score), packed)
return {'ok'}
"""

# On a Cluster an Idempotency-Key (a key on a slot of its own) is claimed before
# its job is admitted on its provider's slot: its value is "<request hash> <job
# id> <claimed at>". take: the value seen before, which this claim replaces (its
# job never came, and the claim is old); '' claims only a free key. Returns
# {'claimed'} or {'seen', the value}.
_IDEM_CLAIM = """
local idem = KEYS[1]
local value, ttl, take = unpack(ARGV, 1, 3)
local seen = redis.call('GET', idem)
if seen and seen ~= take then return {'seen', seen} end
redis.call('SET', idem, value, 'EX', ttl)
return {'claimed'}
"""

# Gives up a claim (its job was refused), unless another request holds it now.
_IDEM_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

# A delivery's start. Returns 'ok' (run it), 'gone' (record expired), 'expired'
# (deadline passed: marked so), 'poison' (delivered too often) or the job's final
# status.
_START = """
local job, events = KEYS[1], KEYS[2]
local now, max_deliveries, deliveries, id, ttl, provider = unpack(ARGV, 1, 6)
local st = redis.call('HMGET', job, 'status', 'deadline', 'provider')
if not st[1] then return 'gone' end
if st[1] ~= 'queued' and st[1] ~= 'in_progress' then return st[1] end
-- On a Cluster a fallback is steps (move_*): a delivery left behind by a worker
-- that died between them is another provider's job now.
if CLUSTER and st[3] ~= provider then return 'moved' end
if tonumber(st[2]) <= tonumber(now) then
  finish(job, events, id, 'expired', now, ttl, nil, 'http_status', 504)
  return 'expired'
end
if tonumber(deliveries) > tonumber(max_deliveries) then return 'poison' end
redis.call('HINCRBY', job, 'attempts', 1)
redis.call('HSET', job, 'status', 'in_progress', 'started_at', now)
return 'ok'
"""

# Closes one queue entry in one call (settle_record, then settle_queue). Returns 1
# if this call made the job final.
_SETTLE = """
return settle_one(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV)
"""

_SETTLE_MANY = """
return settle_many(KEYS, ARGV)
"""

# On a Cluster, a job that fell back to another provider is settled in two steps:
# its record (and reply, on its first provider's slot), then the entry.
_SETTLE_RECORD = """
return settle_record(KEYS[1], KEYS[2], KEYS[3], ARGV)
"""

_SETTLE_QUEUE = """
settle_queue(KEYS[1], ARGV)
return 0
"""

# Fallback: a job still running joins the waiting list of another provider, at
# the front of its tenant's list (it waited already), keeping its class; its
# entry here is acknowledged either way. Returns 1 if it moved.
_MOVE = """
local job, from_queue = KEYS[1], KEYS[2]
local group, entry, packed, provider, history, prefix, from_provider, tenant, class, now, conf,
  consumer, id = unpack(ARGV, 1, 13)
now = tonumber(now)
local moved = 0
local here, there = sched(prefix, from_provider), sched(prefix, provider)
-- Only the consumer that holds the entry moves the job: a stalled worker's entry
-- may have been reclaimed by another, which runs (or moved) the job.
local held = 0
if holds(from_queue, group, entry, consumer) then
  held = redis.call('XACK', from_queue, group, entry)
  redis.call('XDEL', from_queue, entry)
end
local st = redis.call('HMGET', job, 'status', 'created_at')
if held == 1 and (st[1] == 'queued' or st[1] == 'in_progress') then
  push(there, class, tenant, id, tonumber(st[2]) or now, packed, conf, true, true)
  redis.call('HSET', job, 'provider', provider, 'history', history, 'priority', class)
  moved = 1
end
if held == 1 then
  landed(here, tenant, id)
  dispatch(here, now)
end
if moved == 1 then dispatch(there, now) end
return moved
"""

# Fallback on a Cluster, where the record and the two providers' keys are three
# slots: the job store calls these in turn (JobStore.move), after checking that
# its consumer still holds the entry. The record first (it is the source of
# truth: a delivery the first provider redelivers after a crash between the steps
# is dropped by start), then the next provider's waiting list (once: its index is
# a set), then the first provider's entry. Returns {1, created} or {0} (final).
_MOVE_RECORD = """
local job = KEYS[1]
local provider, history, class = unpack(ARGV, 1, 3)
local st = redis.call('HMGET', job, 'status', 'created_at')
if st[1] ~= 'queued' and st[1] ~= 'in_progress' then return {0} end
redis.call('HSET', job, 'provider', provider, 'history', history, 'priority', class)
return {1, st[2]}
"""

# KEYS[1]: the next provider's scheduler state. Returns 1 if the job joined its list.
_MOVE_TO = """
local prefix, provider, class, tenant, id, created, packed, conf, now, deadline =
  unpack(ARGV, 1, 10)
local there = sched(prefix, provider)
local joined = push(there, class, tenant, id, tonumber(created), packed, conf, true, true, deadline)
dispatch(there, tonumber(now))
return joined and 1 or 0
"""

# Whether the consumer holds the entry (KEYS[1]: the queue). Returns 1 or 0.
_HOLDS = """
local group, entry, consumer = unpack(ARGV, 1, 3)
return holds(KEYS[1], group, entry, consumer) and 1 or 0
"""

# Acknowledges the entry the consumer holds, and frees its slot. Returns 1 if held.
_MOVE_FROM = """
local from_queue = KEYS[1]
local group, entry, consumer, prefix, from_provider, tenant, id, now = unpack(ARGV, 1, 8)
if not holds(from_queue, group, entry, consumer) then return 0 end
redis.call('XACK', from_queue, group, entry)
redis.call('XDEL', from_queue, entry)
local here = sched(prefix, from_provider)
landed(here, tenant, id)
dispatch(here, tonumber(now))
return 1
"""

# The client stopped waiting at its deadline: a job not yet final becomes
# 'expired', so no worker starts it. Returns 1 if it did.
_EXPIRE_JOB = """
local job, events = KEYS[1], KEYS[2]
local now, id, ttl, prefix = unpack(ARGV, 1, 4)
local st = redis.call('HMGET', job, 'status', 'provider', 'tenant', 'priority')
if st[1] == 'queued' or st[1] == 'in_progress' then
  finish(job, events, id, 'expired', now, ttl, nil, 'http_status', 504)
  if st[4] and home(st[2], id) then uncount(sched(prefix, st[2]), st[4], st[3], id) end
  return 1
end
return 0
"""

# A job of another tenant is 'gone'. A job not yet final becomes 'cancelled' and
# the worker running it hears of it on the channel; a final job is left alone.
# Returns {'cancelled' or 'final', the job's fields}.
_CANCEL = """
local job, events = KEYS[1], KEYS[2]
local now, tenant, ttl, channel, id, prefix = unpack(ARGV, 1, 6)
local st = redis.call('HMGET', job, 'status', 'tenant', 'provider', 'priority')
if not st[1] or st[2] ~= tenant then return {'gone'} end
local verdict = 'final'
if st[1] == 'queued' or st[1] == 'in_progress' then
  finish(job, events, id, 'cancelled', now, ttl, nil)
  -- A waiting job stops counting at once; its list entry is dropped when reached.
  if st[4] and home(st[3], id) then uncount(sched(prefix, st[3]), st[4], tenant, id) end
  redis.call('PUBLISH', channel, id)
  verdict = 'cancelled'
end
return {verdict, redis.call('HGETALL', job)}
"""

# Records a webhook delivery attempt unless the job is gone; keeps the record at
# least keep_s seconds (0: unchanged).
_WEBHOOK_ATTEMPT = """
local job = KEYS[1]
local keep_s = ARGV[1]
-- ARGV[2…]: webhook field/value pairs
if redis.call('EXISTS', job) == 0 then return 0 end
redis.call('HSET', job, unpack(ARGV, 2))
if tonumber(keep_s) > 0 then redis.call('EXPIRE', job, keep_s, 'GT') end
return 1
"""

# A worker process offers (or, with slots 0, withdraws) its slots for a provider
# until now + ttl; the provider's capacity becomes the live workers' slots, the
# class shares are stored, and dispatch fills what is free. Returns how many
# jobs moved. (A provider's global in-flight cap is not applied here: a dead
# worker's leases free long before its queue entries are reclaimed.)
_REGISTER = """
-- KEYS[1]: the provider's scheduler state (on a Cluster, where the call goes)
local prefix, provider, consumer, slots, ttl, share_async, share_batch = unpack(ARGV, 1, 7)
ttl = tonumber(ttl)
-- Redis's clock, not the caller's: workers' clocks may differ.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local S = sched(prefix, provider)
if tonumber(slots) > 0 then
  redis.call('HSET', S.workers, consumer, slots .. ' ' .. (now + ttl))
else
  redis.call('HDEL', S.workers, consumer)
end
local total = 0
local found = redis.call('HGETALL', S.workers)
for i = 1, #found, 2 do
  local n, until_ = string.match(found[i + 1], '^(%S+) (%S+)$')
  if tonumber(until_) < now then
    redis.call('HDEL', S.workers, found[i])
  else
    total = total + tonumber(n)
  end
end
if total > 0 then
  redis.call('SET', S.capacity, total, 'EX', math.ceil(ttl))
  redis.call('EXPIRE', S.workers, math.ceil(ttl) * 2)
else
  redis.call('DEL', S.capacity)
end
redis.call('HSET', S.state, 'share:async', share_async, 'share:batch', share_batch)
-- The entries count can only be lost with the state hash (deleted by hand, or
-- evicted): recount it from the lists when jobs wait but it says none do.
if tonumber(redis.call('HGET', S.state, 'entries') or '0') <= 0 then
  local n = 0
  for _, c in ipairs(CLASSES) do
    for _, t in ipairs(redis.call('LRANGE', ring(S, c), 0, -1)) do
      n = n + redis.call('LLEN', waiting(S, c, t))
    end
  end
  redis.call('HSET', S.state, 'entries', n)
end
return dispatch(S, now)
"""


_FUNCTIONS = {
    "enqueue": _ENQUEUE,
    "enqueue_many": _ENQUEUE_MANY,
    "submit": _SUBMIT,
    "start": _START,
    "settle": _SETTLE,
    "settle_many": _SETTLE_MANY,
    "move": _MOVE,
    "expire_job": _EXPIRE_JOB,
    "cancel": _CANCEL,
    "webhook_attempt": _WEBHOOK_ATTEMPT,
    "register": _REGISTER,
    "move_record": _MOVE_RECORD,
    "move_to": _MOVE_TO,
    "move_from": _MOVE_FROM,
    "settle_record": _SETTLE_RECORD,
    "holds": _HOLDS,
    "settle_queue": _SETTLE_QUEUE,
    "idem_claim": _IDEM_CLAIM,
    "idem_release": _IDEM_RELEASE,
}


class Functions:
    """One library's functions, by name (the job store calls them)."""

    def __init__(self, library: Library) -> None:
        self.enqueue: Function = library["enqueue"]
        self.enqueue_many: Function = library["enqueue_many"]
        self.submit: Function = library["submit"]
        self.start: Function = library["start"]
        self.settle: Function = library["settle"]
        self.settle_many: Function = library["settle_many"]
        self.move: Function = library["move"]
        self.expire_job: Function = library["expire_job"]
        self.cancel: Function = library["cancel"]
        self.webhook_attempt: Function = library["webhook_attempt"]
        self.register: Function = library["register"]
        self.move_record: Function = library["move_record"]
        self.move_to: Function = library["move_to"]
        self.move_from: Function = library["move_from"]
        self.settle_record: Function = library["settle_record"]
        self.holds: Function = library["holds"]
        self.settle_queue: Function = library["settle_queue"]
        self.idem_claim: Function = library["idem_claim"]
        self.idem_release: Function = library["idem_release"]


def _library(cluster: bool) -> Library:
    mode = f"local CLUSTER = {'true' if cluster else 'false'}\n"
    return Library("llmbc" if cluster else "llmb", mode + _FINISH + _SCHED + _CALLS, _FUNCTIONS)


#: The job store's functions, loaded into Redis as one library; on one Redis...
LIBRARY = _library(cluster=False)
#: ...and on a Redis Cluster (see ``provider_tag`` and ``record``).
CLUSTER_LIBRARY = _library(cluster=True)
ENQUEUE = LIBRARY["enqueue"]
SUBMIT = LIBRARY["submit"]
START = LIBRARY["start"]
SETTLE = LIBRARY["settle"]
MOVE = LIBRARY["move"]
EXPIRE_JOB = LIBRARY["expire_job"]
CANCEL = LIBRARY["cancel"]
WEBHOOK_ATTEMPT = LIBRARY["webhook_attempt"]
REGISTER = LIBRARY["register"]

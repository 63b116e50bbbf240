"""The job-state scripts (Lua), used only by the job store.

Job state only moves forward (queued → in_progress → a final state); every
transition is one script on the job hash, so a late duplicate delivery can never
overwrite a final state. Each script names its arguments on its first lines; the
store passes them in that order, from one typed method per script.
"""

from __future__ import annotations

from llm_broker.shared.redisio import Script

# Makes a job final: status, finish time and more fields, and its TTL (the
# result is kept this long). The job's Idempotency-Key never outlives it, and a
# job with a webhook gets an entry on the webhook event stream.
_FINISH = """
local function finish(job, events, id, status, now, ttl, ...)
  redis.call('HSET', job, 'status', status, 'completed_at', now, ...)
  redis.call('EXPIRE', job, ttl)
  local idem = redis.call('HGET', job, 'idem_key')
  if idem then
    local left = redis.call('TTL', idem)
    if left > tonumber(ttl) then redis.call('EXPIRE', idem, ttl) end
  end
  if redis.call('HEXISTS', job, 'webhook_url') == 1 then
    redis.call('XADD', events, '*', 'i', id)
  end
end
"""

# A synchronous call's admission: the job record and the queue entry.
# Returns the entry id, or nil when the queue is full.
ENQUEUE = Script("""
local queue, job = KEYS[1], KEYS[2]
local max_depth, packed, ttl = ARGV[1], ARGV[2], ARGV[3]
-- ARGV[4…]: the record's field/value pairs
if redis.call('XLEN', queue) >= tonumber(max_depth) then return false end
redis.call('HSET', job, unpack(ARGV, 4))
redis.call('EXPIRE', job, ttl)
return redis.call('XADD', queue, '*', 'j', packed)
""")

# An async submission: the Idempotency-Key check, admission, the job record,
# the queue entry and the tenant's job index in one step. The idempotency key
# is unused unless use_idem is '1'; its value is "<request hash> <job id>".
# Returns {'ok', entry id}, {'full'}, {'dup', idempotency value, the job's fields}
# or {'conflict'} (the key's job is gone or another tenant's).
SUBMIT = Script("""
local queue, job, idem, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local max_depth, packed, ttl, use_idem, idem_value, idem_ttl, id, score, job_prefix, tenant =
  unpack(ARGV, 1, 10)
-- ARGV[11…]: the record's other field/value pairs
if use_idem == '1' then
  local seen = redis.call('GET', idem)
  if seen then
    local seen_id = string.sub(seen, string.find(seen, ' ', 1, true) + 1)
    -- another tenant's job is never returned
    if redis.call('HGET', job_prefix .. seen_id, 'tenant') ~= tenant then return {'conflict'} end
    return {'dup', seen, redis.call('HGETALL', job_prefix .. seen_id)}
  end
end
if redis.call('XLEN', queue) >= tonumber(max_depth) then return {'full'} end
redis.call('HSET', job, 'tenant', tenant, unpack(ARGV, 11))
redis.call('EXPIRE', job, ttl)
local entry = redis.call('XADD', queue, '*', 'j', packed)
if use_idem == '1' then redis.call('SET', idem, idem_value, 'EX', idem_ttl) end
redis.call('ZADD', index, score, id)
-- Bounded upkeep of the index: the oldest few ids whose records expired go.
for _, old in ipairs(redis.call('ZRANGE', index, 0, 3)) do
  if redis.call('EXISTS', job_prefix .. old) == 0 then redis.call('ZREM', index, old) end
end
if redis.call('TTL', index) < tonumber(ttl) then redis.call('EXPIRE', index, ttl) end
return {'ok', entry}
""")

# A delivery's start. Returns 'ok' (run it), 'gone' (record expired), 'expired'
# (deadline passed: marked so), 'poison' (delivered too often) or the job's final
# status.
START = Script(
    _FINISH
    + """
local job, events = KEYS[1], KEYS[2]
local now, max_deliveries, deliveries, id, ttl = unpack(ARGV, 1, 5)
local st = redis.call('HMGET', job, 'status', 'deadline')
if not st[1] then return 'gone' end
if st[1] ~= 'queued' and st[1] ~= 'in_progress' then return st[1] end
if tonumber(st[2]) <= tonumber(now) then
  finish(job, events, id, 'expired', now, ttl, 'http_status', 504)
  return 'expired'
end
if tonumber(deliveries) > tonumber(max_deliveries) then return 'poison' end
redis.call('HINCRBY', job, 'attempts', 1)
redis.call('HSET', job, 'status', 'in_progress', 'started_at', now)
return 'ok'
"""
)

# Closes one queue entry in one call, in this order: make the job final (unless
# it already is, or status is ''), send the reply to the waiting ingress process
# (if any), then acknowledge and delete the entry, so the stream holds only work
# not yet done. The reply's fields come last, built by records.reply_fields;
# without a 'd' field its data is the payload. Returns 1 if this call made the
# job final.
SETTLE = Script(
    _FINISH
    + """
local job, queue, replies, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, entry, id, status, now, field, payload, http_status, ttl, maxlen, history =
  unpack(ARGV, 1, 11)
-- ARGV[12…]: the reply's field/value pairs (none: no reply)
local made = 0
if status ~= '' then
  local st = redis.call('HGET', job, 'status')
  if st == 'queued' or st == 'in_progress' then
    if history ~= '' then
      finish(job, events, id, status, now, ttl, field, payload,
             'http_status', http_status, 'history', history)
    else
      finish(job, events, id, status, now, ttl, field, payload, 'http_status', http_status)
    end
    made = 1
  end
end
if #ARGV > 11 then
  local fields = {unpack(ARGV, 12)}
  local has_data = false
  for i = 1, #fields, 2 do
    if fields[i] == 'd' then has_data = true end
  end
  if not has_data then
    fields[#fields + 1] = 'd'
    fields[#fields + 1] = payload
  end
  redis.call('XADD', replies, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '*', unpack(fields))
end
redis.call('XACK', queue, group, entry)
redis.call('XDEL', queue, entry)
return made
"""
)

# Fallback: a job still running moves on to another provider's queue; its entry
# here is acknowledged either way. Returns 1 if it moved.
MOVE = Script("""
local job, from_queue, to_queue = KEYS[1], KEYS[2], KEYS[3]
local group, entry, packed, provider, history = unpack(ARGV, 1, 5)
local moved = 0
local st = redis.call('HGET', job, 'status')
if st == 'queued' or st == 'in_progress' then
  redis.call('XADD', to_queue, '*', 'j', packed)
  redis.call('HSET', job, 'provider', provider, 'history', history)
  moved = 1
end
redis.call('XACK', from_queue, group, entry)
redis.call('XDEL', from_queue, entry)
return moved
""")

# The client stopped waiting at its deadline: a job not yet final becomes
# 'expired', so no worker starts it. Returns 1 if it did.
EXPIRE_JOB = Script(
    _FINISH
    + """
local job, events = KEYS[1], KEYS[2]
local now, id, ttl = unpack(ARGV, 1, 3)
local st = redis.call('HGET', job, 'status')
if st == 'queued' or st == 'in_progress' then
  finish(job, events, id, 'expired', now, ttl, 'http_status', 504)
  return 1
end
return 0
"""
)

# A job of another tenant is 'gone'. A job not yet final becomes 'cancelled' and
# the worker running it hears of it on the channel; a final job is left alone.
# Returns {'cancelled' or 'final', the job's fields}.
CANCEL = Script(
    _FINISH
    + """
local job, events = KEYS[1], KEYS[2]
local now, tenant, ttl, channel, id = unpack(ARGV, 1, 5)
local st = redis.call('HMGET', job, 'status', 'tenant')
if not st[1] or st[2] ~= tenant then return {'gone'} end
local verdict = 'final'
if st[1] == 'queued' or st[1] == 'in_progress' then
  finish(job, events, id, 'cancelled', now, ttl)
  redis.call('PUBLISH', channel, id)
  verdict = 'cancelled'
end
return {verdict, redis.call('HGETALL', job)}
"""
)

# Records a webhook delivery attempt unless the job is gone; keeps the record at
# least keep_s seconds (0: unchanged).
WEBHOOK_ATTEMPT = Script("""
local job = KEYS[1]
local keep_s = ARGV[1]
-- ARGV[2…]: webhook field/value pairs
if redis.call('EXISTS', job) == 0 then return 0 end
redis.call('HSET', job, unpack(ARGV, 2))
if tonumber(keep_s) > 0 then redis.call('EXPIRE', job, keep_s, 'GT') end
return 1
""")

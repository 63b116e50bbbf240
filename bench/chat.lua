-- wrk script for bench/run.py: POST an OpenAI-style chat body and count bad responses.
--
-- Usage: wrk ... -s bench/chat.lua URL -- MODEL [stream]
--   MODEL   model name sent in the body (default "mock")
--   stream  when given, the body asks for "stream": true and a 2xx response only
--           counts as good if its SSE body ends with "data: [DONE]".
--
-- done() prints two machine-readable lines that bench/run.py parses (wrk's own text
-- rounds latencies to 2 decimals of their unit, e.g. "1.19s"; these are exact):
--   BENCH-LUA non2xx=N bad_stream=M p50_us=X p99_us=Y
--   BENCH-STATUS 429=3 503=1 503-overloaded=12
-- The second counts every non-2xx response by status (nothing after the tag when
-- there was none). A 503 whose body says the gateway is overloaded ("code":"overloaded",
-- or "overloaded_error" in an Anthropic-shaped body) counts as "503-overloaded",
-- any other 503 (e.g. "service_unavailable") as "503". Then one line per status with
-- the first body seen (newlines as spaces, at most 300 bytes), to tell errors apart:
--   BENCH-SAMPLE 503 {"error":{"message":"the queue is unavailable; ...

-- Counters are globals: done() reads them from each thread's Lua state with thread:get().
local threads = {}
non2xx = 0
bad_stream = 0
statuses = {}
samples = {}
streaming = false

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local model = args[1] or "mock"
   streaming = args[2] == "stream"
   local stream_field = streaming and ',"stream":true' or ""
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Hello there"}]'
      .. stream_field .. ',"max_tokens":64}'
end

local function overloaded(body)
   return body ~= nil and (string.find(body, '"code":"overloaded"', 1, true) ~= nil
      or string.find(body, '"overloaded_error"', 1, true) ~= nil)
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      local key = tostring(status)
      if status == 503 and overloaded(body) then
         key = "503-overloaded"
      end
      statuses[key] = (statuses[key] or 0) + 1
      if samples[key] == nil then
         samples[key] = string.sub(string.gsub(body or "", "[\r\n]+", " "), 1, 300)
      end
   elseif streaming and not string.find(body, "data: [DONE]", 1, true) then
      bad_stream = bad_stream + 1
   end
end

function done(summary, latency, requests)
   local total_non2xx, total_bad, by_status, sample = 0, 0, {}, {}
   for _, thread in ipairs(threads) do
      total_non2xx = total_non2xx + (thread:get("non2xx") or 0)
      total_bad = total_bad + (thread:get("bad_stream") or 0)
      for key, n in pairs(thread:get("statuses") or {}) do
         by_status[key] = (by_status[key] or 0) + n
      end
      for key, body in pairs(thread:get("samples") or {}) do
         sample[key] = sample[key] or body
      end
   end
   io.write(string.format("BENCH-LUA non2xx=%d bad_stream=%d p50_us=%d p99_us=%d\n",
      total_non2xx, total_bad, latency:percentile(50), latency:percentile(99)))
   local keys = {}
   for key in pairs(by_status) do
      table.insert(keys, key)
   end
   table.sort(keys)
   local line = "BENCH-STATUS"
   for _, key in ipairs(keys) do
      line = line .. string.format(" %s=%d", key, by_status[key])
   end
   io.write(line .. "\n")
   for _, key in ipairs(keys) do
      io.write(string.format("BENCH-SAMPLE %s %s\n", key, sample[key] or ""))
   end
end

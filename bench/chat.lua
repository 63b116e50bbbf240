-- wrk script for bench/run.py: POST an OpenAI-style chat body and count bad responses.
--
-- Usage: wrk ... -s bench/chat.lua URL -- MODEL [stream]
--   MODEL   model name sent in the body (default "mock")
--   stream  when given, the body asks for "stream": true and a 2xx response only
--           counts as good if its SSE body ends with "data: [DONE]".
--
-- done() prints one machine-readable line that bench/run.py parses (wrk's own text
-- rounds latencies to 2 decimals of their unit, e.g. "1.19s"; these are exact):
--   BENCH-LUA non2xx=N bad_stream=M p50_us=X p99_us=Y

-- Counters are globals: done() reads them from each thread's Lua state with thread:get().
local threads = {}
non2xx = 0
bad_stream = 0
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

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   elseif streaming and not string.find(body, "data: [DONE]", 1, true) then
      bad_stream = bad_stream + 1
   end
end

function done(summary, latency, requests)
   local total_non2xx, total_bad = 0, 0
   for _, thread in ipairs(threads) do
      total_non2xx = total_non2xx + (thread:get("non2xx") or 0)
      total_bad = total_bad + (thread:get("bad_stream") or 0)
   end
   io.write(string.format("BENCH-LUA non2xx=%d bad_stream=%d p50_us=%d p99_us=%d\n",
      total_non2xx, total_bad, latency:percentile(50), latency:percentile(99)))
end

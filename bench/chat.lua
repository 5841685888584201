-- wrk script of the benchmark: POST one chat body with the client's key, print a JSON summary.
-- Environment (set by bench/wrk.py):
--   BENCH_BODY    the request body (JSON text)
--   BENCH_AUTH    the Authorization header value ("Bearer sk-...")
--   BENCH_UNIQUE  "1": replace "@N@" in the body by "<BENCH_RUN>-<counter>" on every request,
--                 so that every body differs (cache misses); otherwise one fixed request.
--   BENCH_RUN     a per-run id (keeps bodies unique across warm-up and measurement runs)

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("BENCH_AUTH") or ""

if os.getenv("BENCH_UNIQUE") == "1" then
  local template = wrk.body
  local run = os.getenv("BENCH_RUN") or tostring(os.time())
  local counter = 0
  request = function()
    counter = counter + 1
    local body = string.gsub(template, "@N@", run .. "-" .. counter)
    return wrk.format(nil, nil, nil, body)
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end

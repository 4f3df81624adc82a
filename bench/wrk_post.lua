-- wrk script (bench/workers_bench.py): every request POSTs the same body; the answers are counted by
-- status, and at the end one line "WRK_JSON {...}" gives the counts, socket errors and latencies (µs).
--   wrk -t1 -c64 -d10s --latency -s bench/wrk_post.lua http://127.0.0.1:PORT/v1/search -- BODY_FILE [CONTENT_TYPE]

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.method, wrk.body = "POST", f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = args[2] or "application/json"
  wrk.headers["Host"] = "localhost" -- the server answers the loopback names only (HTTP 421 otherwise)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "statuses": {%s}, "socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, table.concat(parts, ", "), e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end

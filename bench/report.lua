-- Shared by the wrk scripts: pacing from BENCH_DELAY_MS, and one JSON line of results on stdout
-- when the run ends.

-- With BENCH_DELAY_MS set, every connection pauses that many milliseconds after each answer
-- (bench/run's paced runs and latency curve). Call from the script's init().
function pace_from_env()
  local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "")
  if pace then
    delay = function() return pace end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end

-- Shared by the wrk scripts: pacing from BENCH_DELAY_MS, and one JSON line of results on stdout
-- when the run ends.

-- With BENCH_DELAY_MS set, every connection pauses after each answer (bench/run's paced runs and
-- latency curve), for that many milliseconds on average. The pauses are drawn from an exponential
-- distribution (whole milliseconds, wrk's unit), so the connections' requests arrive as
-- independent clients' would (a Poisson stream). With a fixed pause (BENCH_PACING=fixed) the
-- connections, all started at once, stay in step: every pause ends in a burst of one request per
-- connection, and p99 measures how long the server takes to drain that burst, not the latency
-- of a request at that load. Call from the script's init(), after seeding math.random per thread.
function pace_from_env()
  local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "")
  if not pace then
    return
  end
  if os.getenv("BENCH_PACING") == "fixed" then
    delay = function() return pace end
  else
    delay = function() return math.floor(-pace * math.log(1 - math.random()) + 0.5) end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end

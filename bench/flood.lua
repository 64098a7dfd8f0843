-- A flood from distinct sources: every request names a new client address in X-Forwarded-For
-- (the dev listener trusts 127.0.0.1 as a proxy), without credentials, so each one is a new key
-- for the pre-authentication limiter.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local threads = 0
local n = 0

function setup(thread)
  threads = threads + 1
  thread:set("index", threads)
end

function request()
  n = n + 1
  local k = n * 16 + index
  local address = string.format("10.%d.%d.%d",
    math.floor(k / 65536) % 256, math.floor(k / 256) % 256, k % 256)
  if k >= 16777216 then
    address = string.format("2001:db8:%x:%x::1", math.floor(k / 65536), k % 65536)
  end
  return wrk.format("GET", "/openstack/latest/password", {["X-Forwarded-For"] = address})
end

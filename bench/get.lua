-- GET /openstack/latest/password as the metadata proxy sends it, for a random instance out of
-- the ids file (bench-populate's get-ids.txt: "<id> <signature>" per line).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local ids, sigs = {}, {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end

function init(args)
  for line in io.lines(os.getenv("BENCH_IDS")) do
    local id, sig = line:match("^(%S+) (%S+)$")
    ids[#ids + 1] = id
    sigs[#sigs + 1] = sig
  end
  math.randomseed(os.time() * 1000 + (seed or 0))
  pace_from_env()
end

function request()
  local i = math.random(#ids)
  return wrk.format("GET", "/openstack/latest/password", {
    ["X-Instance-ID"] = ids[i],
    ["X-Tenant-ID"] = "project-a",
    ["X-Instance-ID-Signature"] = sigs[i],
  })
end

-- POST /openstack/2013-04-04/password: every request a distinct registered instance posting once
-- (bench-populate's post-ids.txt), the threads taking disjoint shares of the file.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local threads = 0
local ids, sigs = {}, {}
local next_index = 1

function setup(thread)
  threads = threads + 1
  thread:set("index", threads)
end

function init(args)
  local count = tonumber(os.getenv("BENCH_THREADS"))
  local n = 0
  for line in io.lines(os.getenv("BENCH_IDS")) do
    n = n + 1
    if n % count == index - 1 then
      local id, sig = line:match("^(%S+) (%S+)$")
      ids[#ids + 1] = id
      sigs[#sigs + 1] = sig
    end
  end
  local f = io.open(os.getenv("BENCH_DIR_DATA") .. "/blob.txt")
  blob = f:read("*a")
  f:close()
end

function request()
  local i = next_index
  next_index = next_index + 1
  if i > #ids then i = ((i - 1) % #ids) + 1 end -- past the end: repeats answer 409
  return wrk.format("POST", "/openstack/2013-04-04/password", {
    ["X-Instance-ID"] = ids[i],
    ["X-Tenant-ID"] = "project-a",
    ["X-Instance-ID-Signature"] = sigs[i],
    ["Content-Type"] = "text/plain",
  }, blob)
end

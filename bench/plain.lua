-- GET of the password path with no metapass headers (nginx, the bare server).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
wrk.path = "/openstack/latest/password"

local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end

function init(args)
  math.randomseed(os.time() * 1000 + (seed or 0))
  pace_from_env()
end

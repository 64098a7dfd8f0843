-- GET of the password path with no metapass headers (nginx, the bare server).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
wrk.path = "/openstack/latest/password"

function init(args)
  pace_from_env()
end

-- GET of the password path with no metapass headers (nginx, the bare server).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
wrk.path = "/openstack/latest/password"

function init(args)
  local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "")
  if pace then
    delay = function() return pace end
  end
end

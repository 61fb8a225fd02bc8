-- wrk script: replays pre-generated distinct pushes (from the wrk_requests example),
-- each thread taking every Nth line so that no two threads send the same push.
-- Usage: wrk -t2 -c32 -d10s -s bench/requests.lua http://127.0.0.1:PORT -- FILE

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local file = args[1]
  reqs = {}
  local i = 0
  for line in io.lines(file) do
    if i % tonumber(os.getenv("WRK_THREADS") or "2") == id then
      local target, body = line:match("^([^\t]*)\t(.*)$")
      reqs[#reqs + 1] = wrk.format("POST", target, { ["Content-Type"] = "text/xml" }, body)
    end
    i = i + 1
  end
  n = 0
end

function request()
  n = n + 1
  if n > #reqs then
    -- Out of distinct pushes: from here on the same pushes come again (retries).
    wrapped = true
    n = 1
  end
  return reqs[n]
end

function done(summary, latency, requests)
  io.write(string.format("p50_us=%d p99_us=%d max_us=%d\n", latency:percentile(50), latency:percentile(99), latency.max))
end

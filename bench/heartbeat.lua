-- wrk script: POST /v1/heartbeat rotating device ids.
-- usage: wrk -tT ... -s bench/heartbeat.lua URL -- DEVICES MODE PREFIX T
--   MODE liveness:   {"device": ID}                      (refreshes liveness only, once registered)
--   MODE transition: {"device": ID, "state": S}           S alternates unplugged/online per device round,
--                                                          so every heartbeat of a registered (online) device
--                                                          is a state change
-- Each wrk thread takes its own slice of the ids, so a device is never in flight twice at once.

local threads_total = 0

function setup(thread)
  thread:set("tid", threads_total)
  threads_total = threads_total + 1
end

local n = 10000
local mode = "liveness"
local prefix = "bench-"
local counter = 0
local my_tid = 0
local my_threads = 1
local per_thread = n
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  n = tonumber(args[1]) or n
  mode = args[2] or mode
  prefix = args[3] or prefix
  my_tid = tonumber(tid) or 0
  my_threads = tonumber(args[4]) or 1
  per_thread = math.floor(n / my_threads)
end

function request()
  local k = counter % per_thread
  local round = math.floor(counter / per_thread)
  counter = counter + 1
  local id = string.format("%s%06d", prefix, k * my_threads + my_tid)
  local body
  if mode == "transition" then
    local state = "online"
    if round % 2 == 0 then
      state = "unplugged"
    end
    body = '{"device":"' .. id .. '","state":"' .. state .. '"}'
  else
    body = '{"device":"' .. id .. '"}'
  end
  return wrk.format("POST", "/v1/heartbeat", headers, body)
end

-- Manual runs through the REST API (POST /api/workflows/{id}/run), each with an
-- Idempotency-Key of its own when a key prefix is given (the gateway's idempotency store).
-- args: <path> <API key> [key prefix]
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  path = args[1]
  auth = "Bearer " .. args[2]
  prefix = args[3] or ""
  n = 0
end

function request()
  n = n + 1
  local headers = {["Authorization"] = auth, ["Content-Type"] = "application/json"}
  if prefix ~= "" then headers["Idempotency-Key"] = prefix .. "-" .. tid .. "-" .. n end
  return wrk.format("POST", path, headers, '{"payload":{"t":0,"n":' .. n .. '}}')
end

-- Replays pre-signed Standard Webhooks requests (one unique webhook-id per request).
-- args: <file> <path>; each thread takes every n-th line so ids never repeat across threads.
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  lines = {}
  for line in io.lines(args[1]) do
    lines[#lines + 1] = line
  end
  path = args[2]
  idx = tid
  stride = 2
end

function request()
  local line = lines[(idx % #lines) + 1]
  idx = idx + stride
  local id, ts, sig, key, body = line:match("([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)")
  local headers = {["webhook-id"] = id, ["webhook-timestamp"] = ts, ["webhook-signature"] = sig, ["Content-Type"] = "application/json"}
  if key ~= "" then headers["Idempotency-Key"] = key end
  return wrk.format("POST", path, headers, body)
end

-- cancel: end a request's output stream as cancelled, unless it has ended already.
--
-- KEYS[1]    stream       stream  the request's output stream (entries as append.lua writes them)
-- KEYS[2]    metrics      hash    the topic's cancellation counters (field "requests")
-- ARGV[1]    request_id           the request's id
-- ARGV[2]    ttl_ms               how long the ended stream is kept (ms)
--
-- The end entry holds a result with finish_reason "cancelled" and the tokens streamed so far.
-- Every node that still works on the request learns of it from its next append (append.lua
-- returns the end), stops, and frees its KV: no extra round trip on the token path.
-- Returns {1, end JSON} when this call ended the stream, {0, end JSON} when it had ended before.
local stream = KEYS[1]
local metrics = KEYS[2]
local request_id = ARGV[1]
local ttl_ms = ARGV[2]

local text, ids, last_seq = {}, {}, -1
for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+')) do
  local fields = entry[2]
  if fields[3] == 'end' then return {0, fields[2]} end
  local chunk = cjson.decode(fields[2])
  text[#text + 1] = chunk.text or ''
  for _, t in ipairs(chunk.token_ids or {}) do ids[#ids + 1] = string.format('%d', t) end
  last_seq = tonumber(string.match(entry[1], '%-(%d+)$')) - 1
end
local seq = last_seq + 1
local result = '{"request_id":' .. cjson.encode(request_id)
  .. ',"text":' .. cjson.encode(table.concat(text))
  .. ',"token_ids":[' .. table.concat(ids, ',') .. ']'
  .. ',"finish_reason":"cancelled","served_by":[],"stolen":false,"ttft_s":0.0,"tpot_s":0.0,"extra":{}}'
local payload = '{"seq":' .. seq .. ',"result":' .. result .. '}'
redis.call('XADD', stream, '0-' .. (seq + 1), 'd', payload, 'end', '1')
redis.call('PEXPIRE', stream, ttl_ms)
redis.call('HINCRBY', metrics, 'requests', 1)
return {1, payload}

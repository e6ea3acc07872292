-- append: chunks of one request's output, each once, and its end, once.
--
-- KEYS[1]    stream           stream  entries 0-<seq+1>, field d = JSON chunk; the final entry
--                                     also has field end = 1
-- KEYS[2]    record           string  (optional) a result-backend key: with the final entry,
--                                     SET to record_value (EX record_ttl_s) and PUBLISHed, in
--                                     the same step, when this call ends the stream (not when
--                                     an earlier run did)
-- ARGV[1]    ttl_ms                   the stream's expiry (ms)
-- ARGV[2]    final                    "1" if the last pair is the final entry
-- ARGV[3]    record_ttl_s             the record's expiry (s; unused without KEYS[2])
-- ARGV[4]    record_value             the record's value (unused without KEYS[2])
-- ARGV[5..]  chunks                   pairs of (seq, JSON)
--
-- Returns the final entry's JSON when the stream has ended (by this call or an earlier run),
-- else false. Entries at or below the last seq written are skipped: a request run twice never
-- shows its caller a chunk twice.
local stream = KEYS[1]
local record = KEYS[2]
local ttl_ms = ARGV[1]
local final = ARGV[2] == '1'
local record_ttl_s = ARGV[3]
local record_value = ARGV[4]
local chunks = {}
for i = 5, #ARGV - 1, 2 do chunks[#chunks + 1] = {tonumber(ARGV[i]), ARGV[i + 1]} end

local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local last_seq = -1
if #last > 0 then
  local fields = last[1][2]
  if fields[3] == 'end' then return fields[2] end
  last_seq = tonumber(string.match(last[1][1], '%-(%d+)$')) - 1
end
for i, chunk in ipairs(chunks) do
  local seq, payload = chunk[1], chunk[2]
  if seq > last_seq then
    if final and i == #chunks then
      redis.call('XADD', stream, '0-' .. (seq + 1), 'd', payload, 'end', '1')
    else
      redis.call('XADD', stream, '0-' .. (seq + 1), 'd', payload)
    end
    last_seq = seq
  end
end
redis.call('PEXPIRE', stream, ttl_ms)
if final then
  if record then
    redis.call('SET', record, record_value, 'EX', record_ttl_s)
    redis.call('PUBLISH', record, record_value)
  end
  if #chunks > 0 then return chunks[#chunks][2] end
end
return false

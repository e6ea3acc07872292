-- admit: a place in the local queue, if fewer than the maximum are waiting.
--
-- KEYS[1]    pending      zset    admission tickets: ticket -> deadline (epoch ms)
-- ARGV[1]    now_ms               epoch ms
-- ARGV[2]    max_size             most tickets waiting at once (scheduler_max_size)
-- ARGV[3]    ticket               the new ticket
-- ARGV[4]    deadline_ms          when it leaves by itself if never released (epoch ms)
--
-- Returns the number waiting before this one when admitted, or -1 when full.
local pending = KEYS[1]
local now_ms = tonumber(ARGV[1])
local max_size = tonumber(ARGV[2])
local ticket = ARGV[3]
local deadline_ms = tonumber(ARGV[4])

redis.call('ZREMRANGEBYSCORE', pending, '-inf', now_ms)
local waiting = redis.call('ZCARD', pending)
if waiting >= max_size then return -1 end
redis.call('ZADD', pending, deadline_ms, ticket)
if redis.call('PTTL', pending) < deadline_ms - now_ms then
  redis.call('PEXPIREAT', pending, deadline_ms)  -- the set outlives its last ticket, no longer
end
return waiting

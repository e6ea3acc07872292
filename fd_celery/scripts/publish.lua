-- publish: a node's heartbeat and its load score, computed from the truth.
--
-- KEYS[1]    shard        zset    the node's load shard: node -> load score
-- KEYS[2]    nodes        zset    node -> last heartbeat (epoch ms)
-- KEYS[3]    facts        hash    the node's facts (role, slots, running, ...)
-- KEYS[4]    ledger       zset    the node's prefill ledger: "<request id>|<tokens>" -> release
--                                 deadline (epoch ms)
-- KEYS[5..]  queue_lists  list    the lists of the node's own queue, one per priority
-- ARGV[1]    node                 the node's name
-- ARGV[2]    running              requests it is running
-- ARGV[3]    slots                requests it runs at once (at least 1)
-- ARGV[4]    now_ms               epoch ms: the heartbeat
-- ARGV[5]    token_unit           prompt tokens that weigh as much as one request
-- ARGV[6]    kv_running           its KV cache in use, in requests: slots x blocks used / blocks
--                                 (0 where the node's engine is not in its process)
-- ARGV[7]    kv_free_tokens       tokens its KV cache has free ('' where unknown): a fact
--
-- Returns {score as a string (Lua would truncate a number), requests waiting in its queue,
-- 1 if the node's facts are still there (0 after Redis lost its data: the node registers again)}.
local shard = KEYS[1]
local nodes = KEYS[2]
local facts = KEYS[3]
local ledger = KEYS[4]
local queue_lists = {unpack(KEYS, 5)}
local node = ARGV[1]
local running = ARGV[2]
local slots = tonumber(ARGV[3])
local now_ms = ARGV[4]
local token_unit = tonumber(ARGV[5])
local kv_running = tonumber(ARGV[6]) or 0
local kv_free_tokens = ARGV[7]

local waiting = 0
for _, list in ipairs(queue_lists) do waiting = waiting + redis.call('LLEN', list) end
-- Charges past their deadline belong to prefills that never ended (their node died with them).
redis.call('ZREMRANGEBYSCORE', ledger, '-inf', now_ms)
local tokens = 0
for _, entry in ipairs(redis.call('ZRANGE', ledger, 0, -1)) do
  tokens = tokens + (tonumber(string.match(entry, '|(%d+)$')) or 0)
end
-- A node is as busy as the larger of its running requests and its KV cache in use.
local score = (waiting + math.max(tonumber(running), kv_running) + tokens / token_unit) / slots
redis.call('ZADD', shard, score, node)
redis.call('ZADD', nodes, now_ms, node)
local known = redis.call('HEXISTS', facts, 'role')
redis.call('HSET', facts, 'running', running)
if kv_free_tokens ~= '' then redis.call('HSET', facts, 'kv_free_tokens', kv_free_tokens) end
return {tostring(score), waiting, known}

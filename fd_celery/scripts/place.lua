-- place: a live node with the lowest load score, at random among those within the blur band
-- above it, charged the request it is given.
--
-- KEYS[1]    nodes          zset    node -> last heartbeat (epoch ms)
-- KEYS[2..]  shards         zset    every load shard of the roles considered: node -> load score
-- ARGV[1]    now_ms                 epoch ms
-- ARGV[2]    expire_ms              a node silent this long is dead (scheduler_expire_period)
-- ARGV[3]    random                 a random integer (Lua's own math.random is seeded
--                                   identically on every call)
-- ARGV[4]    facts_prefix           node hash prefix "fd:T:node:" (its field slots)
-- ARGV[5]    blur                   nodes within this much of the lowest score are equally good
-- ARGV[6]    charge                 in requests: 1 + prefill tokens / PREFILL_TOKEN_UNIT
-- ARGV[7]    ledger_prefix          prefill ledger prefix "fd:T:ptok:" ('' for no ledger entry)
-- ARGV[8]    ledger_entry           "<request id>|<tokens>"
-- ARGV[9]    release_ms             when that entry stops weighing if its prefill never ends
--                                   (epoch ms)
--
-- Returns {node, its shard key}, or false when no node is live.
local nodes = KEYS[1]
local shards = {unpack(KEYS, 2)}
local now_ms = tonumber(ARGV[1])
local expire_ms = tonumber(ARGV[2])
local random = tonumber(ARGV[3])
local facts_prefix = ARGV[4]
local blur = tonumber(ARGV[5])
local charge = tonumber(ARGV[6])
local ledger_prefix = ARGV[7]
local ledger_entry = ARGV[8]
local release_ms = ARGV[9]

local oldest = now_ms - expire_ms
local live, best_score = {}, nil
for _, shard in ipairs(shards) do
  local rows = redis.call('ZRANGE', shard, 0, -1, 'WITHSCORES')
  for j = 1, #rows, 2 do
    local node, score = rows[j], tonumber(rows[j + 1])
    local beat = redis.call('ZSCORE', nodes, node)
    if beat and tonumber(beat) >= oldest then
      live[#live + 1] = {node, score, shard}
      if best_score == nil or score < best_score then best_score = score end
    end
  end
end
if best_score == nil then return false end
local band = {}
for _, c in ipairs(live) do
  if c[2] <= best_score + blur + 1e-9 then band[#band + 1] = c end
end
local pick = band[(random % #band) + 1]
local slots = tonumber(redis.call('HGET', facts_prefix .. pick[1], 'slots') or '1') or 1
redis.call('ZINCRBY', pick[3], charge / math.max(slots, 1), pick[1])
if ledger_prefix ~= '' then redis.call('ZADD', ledger_prefix .. pick[1], release_ms, ledger_entry) end
return {pick[1], pick[3]}

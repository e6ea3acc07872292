-- steal: an idle thief takes the oldest waiting request of a busy (or dead) node of its role.
--
-- KEYS[1]    nodes            zset    node -> last heartbeat (epoch ms)
-- KEYS[2]    steals           hash    "<node>:made" / "<node>:suffered" -> steal counters
-- KEYS[3]    thief_shard      zset    the thief's load shard: node -> load score
-- KEYS[4..]  shards           zset    every load shard of the role: node -> load score
-- ARGV[1]    thief                    the stealing node's name
-- ARGV[2]    now_ms                   epoch ms
-- ARGV[3]    expire_ms                a node silent this long is dead (scheduler_expire_period)
-- ARGV[4]    min_score                live nodes are stolen from at this load score or above
-- ARGV[5]    random                   a random integer (picks among the top candidates)
-- ARGV[6]    queue_prefix             node queue prefix "fd.T.<role>." (a node's queue is the
--                                     prefix + its name; its lists are that + a priority suffix)
-- ARGV[7]    marker_prefix            stolen marker prefix "fd:T:stolen:" (+ request id)
-- ARGV[8]    marker_ttl_s             the marker's expiry (s)
-- ARGV[9]    facts_prefix             node hash prefix "fd:T:node:" (fields slots, running)
-- ARGV[10]   idle_since_ms            when the thief became idle (epoch ms), kept in the marker
-- ARGV[11]   forget_after_ms          a dead node with nothing left to steal, silent this long,
--                                     leaves the load table
-- ARGV[12]   thief_running            requests the thief runs now
-- ARGV[13]   top_candidates           thieves spread over this many best victims, at random
-- ARGV[14..] suffixes                 priority suffixes of a queue's lists, in kombu's consume
--                                     order
--
-- Returns false, or {victim, request id ('' when the message has none), 1 if the victim is dead
-- else 0, the victim's score as a string}.
local nodes = KEYS[1]
local steals = KEYS[2]
local thief_shard = KEYS[3]
local shards = {unpack(KEYS, 4)}
local thief = ARGV[1]
local now_ms = tonumber(ARGV[2])
local expire_ms = tonumber(ARGV[3])
local min_score = tonumber(ARGV[4])
local random = tonumber(ARGV[5])
local queue_prefix = ARGV[6]
local marker_prefix = ARGV[7]
local marker_ttl_s = ARGV[8]
local facts_prefix = ARGV[9]
local idle_since_ms = ARGV[10]
local forget_after_ms = tonumber(ARGV[11])
local thief_running = ARGV[12]
local top_candidates = tonumber(ARGV[13])
local suffixes = {unpack(ARGV, 14)}

local oldest = now_ms - expire_ms
local forget_before = now_ms - forget_after_ms
for _, sfx in ipairs(suffixes) do
  if redis.call('LLEN', queue_prefix .. thief .. sfx) > 0 then return false end
end
local cands = {}
for _, shard in ipairs(shards) do
  local rows = redis.call('ZRANGE', shard, 0, -1, 'WITHSCORES')
  for j = 1, #rows, 2 do
    local node, score = rows[j], tonumber(rows[j + 1])
    if node ~= thief then
      local beat = redis.call('ZSCORE', nodes, node)
      local dead = (not beat) or tonumber(beat) < oldest
      if dead or score >= min_score then
        local first, waiting = nil, 0
        for _, sfx in ipairs(suffixes) do
          local n = redis.call('LLEN', queue_prefix .. node .. sfx)
          if n > 0 and not first then first = sfx end
          waiting = waiting + n
        end
        -- A live node keeps what it can start itself: only requests beyond its free slots
        -- (slots - running) can be stolen, so a request just stolen is not stolen again.
        local free = 0
        if not dead then
          local facts = redis.call('HMGET', facts_prefix .. node, 'slots', 'running')
          free = math.max(0, (tonumber(facts[1]) or 1) - (tonumber(facts[2]) or 0))
        end
        if first and waiting > free then
          cands[#cands + 1] = {node, first, score, dead, shard}
        end
        if dead and not first and (not beat or tonumber(beat) < forget_before) then
          redis.call('ZREM', shard, node)
        end
      end
    end
  end
end
if #cands == 0 then return false end
-- Orphans first (nobody else will run them), then the most loaded.
table.sort(cands, function(a, b)
  if a[4] ~= b[4] then return a[4] end
  return a[3] > b[3]
end)
local c = cands[(random % math.min(top_candidates, #cands)) + 1]
local victim, victim_list = c[1], c[2]
local msg = redis.call('LMOVE', queue_prefix .. victim .. victim_list, queue_prefix .. thief .. victim_list,
                       'RIGHT', 'RIGHT')
if not msg then return false end
local function slots(node)
  return math.max(1, tonumber(redis.call('HGET', facts_prefix .. node, 'slots') or '1') or 1)
end
redis.call('ZINCRBY', c[5], -1 / slots(victim), victim)
redis.call('ZINCRBY', thief_shard, 1 / slots(thief), thief)
-- The thief's running count as of now: the request in its queue is one it can start at once,
-- so no other thief may take it before the next heartbeat says so.
redis.call('HSET', facts_prefix .. thief, 'running', thief_running)
redis.call('HINCRBY', steals, thief .. ':made', 1)
redis.call('HINCRBY', steals, victim .. ':suffered', 1)
local ok, decoded = pcall(cjson.decode, msg)
local id = ''
if ok and type(decoded) == 'table' and type(decoded.headers) == 'table'
   and type(decoded.headers.id) == 'string' then
  id = decoded.headers.id
  redis.call('SET', marker_prefix .. id, victim .. '|' .. idle_since_ms, 'EX', marker_ttl_s)
end
return {victim, id, c[4] and 1 or 0, tostring(c[3])}

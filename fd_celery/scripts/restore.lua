-- restore: a message a dead node held goes back to its queue, first in line, unless somebody
-- else moved it meanwhile (an ack, kombu's own restore, another node).
--
-- KEYS[1]    unacked      hash    kombu's unacked messages: delivery tag -> [message, exchange,
--                                 routing key] (JSON)
-- KEYS[2]    index        zset    kombu's unacked index: delivery tag -> delivered (epoch s)
-- KEYS[3]    queue_list   list    the list of the message's queue for its priority
-- ARGV[1]    tag                  the delivery tag
-- ARGV[2]    entry                the unacked entry as read
-- ARGV[3]    message              the message to requeue (marked redelivered)
--
-- Returns 1 if the message went back, 0 if it was no longer there as read.
local unacked = KEYS[1]
local index = KEYS[2]
local queue_list = KEYS[3]
local tag = ARGV[1]
local entry = ARGV[2]
local message = ARGV[3]

if redis.call('HGET', unacked, tag) ~= entry then return 0 end
redis.call('HDEL', unacked, tag)
redis.call('ZREM', index, tag)
-- kombu consumes from the right: the right end is first in line.
redis.call('RPUSH', queue_list, message)
return 1

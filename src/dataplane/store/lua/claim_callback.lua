-- KEYS: pending, deadlines, dedupe, enriched-at, counters, sink, settlements, inputs, refreshing
-- ARGV: row_id, result json, now ms, sink maxlen (0 = none), reported cost ('' when absent),
--       '1' when the sink is the HTTP outbox (delivered later) else '0'
--#include sink_append
local pending = redis.call('HGET', KEYS[1], ARGV[1])
if not pending then
  redis.call('HINCRBY', KEYS[5], 'duplicateCallbacks', 1)
  return false
end
-- The credit settlement this delivery owes, done by whichever receiver gets to it.
redis.call('HSET', KEYS[7], ARGV[1], ARGV[5] .. '|' .. pending)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local key = cjson.decode(pending)['key']
redis.call('HSET', KEYS[3], key, ARGV[3] .. '|' .. ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], key)
redis.call('HSET', KEYS[8], key, pending)
redis.call('ZREM', KEYS[9], key)
local fields = {'row_id', ARGV[1], 'key', key, 'result', ARGV[2]}
if ARGV[6] == '1' then
  table.insert(fields, 'pending')
  table.insert(fields, pending)
end
append_to_sink(KEYS[6], ARGV[4], fields)
redis.call('HINCRBY', KEYS[5], 'enriched', 1)
if ARGV[6] ~= '1' then redis.call('HINCRBY', KEYS[5], 'delivered', 1) end
redis.call('HSET', KEYS[5], 'lastEnrichedAtMs', ARGV[3])
return pending

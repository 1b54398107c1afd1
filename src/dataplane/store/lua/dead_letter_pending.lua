-- KEYS: pending, deadlines, dead-letter stream, counters; ARGV: row_id, reason
local pending = redis.call('HGET', KEYS[1], ARGV[1])
if not pending then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local p = cjson.decode(pending)
redis.call('XADD', KEYS[3], '*', 'row_id', ARGV[1], 'reason', ARGV[2], 'row', cjson.encode(p['row']), 'attempts', tostring(p['attempt']))
redis.call('HINCRBY', KEYS[4], 'deadLettered', 1)
redis.call('HINCRBY', KEYS[4], 'deadLettered:' .. ARGV[2], 1)
return pending

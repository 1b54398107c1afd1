-- KEYS: outbox, dead-letter stream, counters
-- ARGV: group, entry id, row_id, reason, row json, attempts, detail
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'row_id', ARGV[3], 'reason', ARGV[4], 'row', ARGV[5], 'attempts', ARGV[6], 'detail', ARGV[7])
redis.call('HINCRBY', KEYS[3], 'deadLettered', 1)
redis.call('HINCRBY', KEYS[3], 'deadLettered:' .. ARGV[4], 1)
return 1

-- KEYS: dead-letter stream, counters, source; ARGV: row_id, reason, row json, attempts, group, entry id
--#include source_guard
if not first_sight(KEYS[3], ARGV[5]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'row_id', ARGV[1], 'reason', ARGV[2], 'row', ARGV[3], 'attempts', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'deadLettered', 1)
redis.call('HINCRBY', KEYS[2], 'deadLettered:' .. ARGV[2], 1)
ack(KEYS[3], ARGV[5], ARGV[6])
return 1

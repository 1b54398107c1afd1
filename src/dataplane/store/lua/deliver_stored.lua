-- KEYS: sink, counters, source
-- ARGV: row_id, key, result json, group, entry id, sink maxlen, row json, '1' when the sink is the outbox
--#include source_guard
--#include sink_append
if not first_sight(KEYS[3], ARGV[4]) then return 0 end
local fields = {'row_id', ARGV[1], 'key', ARGV[2], 'result', ARGV[3], 'row', ARGV[7], 'deduplicated', '1'}
append_to_sink(KEYS[1], ARGV[6], fields)
redis.call('HINCRBY', KEYS[2], 'deduplicated', 1)
if ARGV[8] ~= '1' then redis.call('HINCRBY', KEYS[2], 'delivered', 1) end
ack(KEYS[3], ARGV[4], ARGV[5])
return 1

-- KEYS: pending, deadlines, counters, source; ARGV: row_id, pending json, deadline ms, group, entry id
--#include source_guard
-- This very write again (a retry after a timeout): it is ours.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  ack(KEYS[4], ARGV[4], ARGV[5])
  return 1
end
if not first_sight(KEYS[4], ARGV[4]) then return 0 end
local created = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if created == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'submitted', 1)
end
ack(KEYS[4], ARGV[4], ARGV[5])
return created

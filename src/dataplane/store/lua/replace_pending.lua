-- KEYS: pending, deadlines; ARGV: row_id, pending json, deadline ms, expected old reservation
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
-- This very write again (a retry after a timeout): it is ours.
if current == ARGV[2] then return 1 end
if cjson.decode(current)['reservation'] ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1

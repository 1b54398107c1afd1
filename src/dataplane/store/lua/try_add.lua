-- KEYS: sources; ARGV: source, n, limit
local count = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if count + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return -1 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])

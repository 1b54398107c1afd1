-- Keys a refresh run took but whose rows never completed (the run or the
-- row died) go back to the stale index after their lease, as very stale.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, key in ipairs(expired) do
  redis.call('ZADD', KEYS[1], 0, key)
  redis.call('ZREM', KEYS[2], key)
end

-- KEYS: enriched-at, refreshing, inputs; ARGV: lease cutoff ms, stale cutoff ms, now ms, limit
--#include return_expired_refreshes
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[4])
local out = {}
for _, key in ipairs(keys) do
  -- Moving the key out of the index is what stops a concurrent run taking it too.
  redis.call('ZREM', KEYS[1], key)
  redis.call('ZADD', KEYS[2], ARGV[3], key)
  table.insert(out, key)
  table.insert(out, redis.call('HGET', KEYS[3], key) or '')
end
return out

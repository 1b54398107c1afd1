-- KEYS: deadlines, pending; ARGV: now ms, lease until ms, limit
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  local p = redis.call('HGET', KEYS[2], id)
  if p then table.insert(out, p) end
end
return out

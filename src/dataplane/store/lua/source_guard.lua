-- The source part of a script that makes a row pending or terminal:
-- KEYS[n] is the source stream (acknowledged at the end) or, for a Kafka
-- record (ARGV group ''), its seen-marker: a record seen before is a replay
-- and the script does nothing.
local function first_sight(key, group)
  if group ~= '' then return true end
  return redis.call('SET', key, '1', 'NX', 'EX', 604800) ~= false
end
local function ack(key, group, id)
  if group ~= '' then redis.call('XACK', key, group, id) end
end

-- KEYS: dead-letter stream, source stream, counters; ARGV: dead-letter entry id
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entries == 0 then return 0 end
local fields = entries[1][2]
local row_id, row
for i = 1, #fields, 2 do
  if fields[i] == 'row_id' then row_id = fields[i + 1] end
  if fields[i] == 'row' then row = fields[i + 1] end
end
redis.call('XADD', KEYS[2], '*', 'row_id', row_id, 'row', row)
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'replayed', 1)
return 1

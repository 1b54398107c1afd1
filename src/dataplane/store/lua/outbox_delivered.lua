-- KEYS: outbox, counters; ARGV: group, entry ids...
-- Returns how many entries this call completed.
local done = 0
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    done = done + 1
  end
end
if done > 0 then redis.call('HINCRBY', KEYS[2], 'delivered', done) end
return done

-- Appends a delivered row to the sink stream, trimmed to about maxlen
-- entries when maxlen > 0.
local function append_to_sink(stream, maxlen, fields)
  if tonumber(maxlen) > 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  else
    redis.call('XADD', stream, '*', unpack(fields))
  end
end

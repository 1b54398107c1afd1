-- KEYS: enriched-at, refreshing; ARGV: lease cutoff ms, stale cutoff ms
--#include return_expired_refreshes
return redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[2])

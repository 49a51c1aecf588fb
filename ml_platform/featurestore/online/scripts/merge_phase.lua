-- Bulk load done: stream updates now go straight into the new version. KEYS[1]: meta; ARGV[1]: version.
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return redis.error_reply('SUPERSEDED') end
redis.call('HSET', KEYS[1], 'building_phase', 'merge')
return 1

-- Cluster: the global flip of a view, in its meta hash (KEYS[1]); the buckets follow (commit).
-- ARGV: version, fingerprint, rows, then field, value pairs to record. Returns the old version.
local m = redis.call('HMGET', KEYS[1], 'building', 'version')
if m[1] ~= ARGV[1] then return redis.error_reply('SUPERSEDED') end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'current_fp', ARGV[2], 'rows', ARGV[3])
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
redis.call('HDEL', KEYS[1], 'building', 'building_key', 'building_fp', 'building_phase', 'building_overlay')
return m[2] or ''

-- Cluster: make version ARGV[1] (flipped in the global meta already) the bucket's current one.
-- KEYS[1]: ptr hash. ARGV: version, its data key here, fingerprint, '1' to delete the old data
-- key now (retire grace 0). Idempotent: a bucket already at the version (or past it) is left
-- alone. Returns {old version, old data key} ('' when nothing changed).
local m = redis.call('HMGET', KEYS[1], 'version', 'next', 'current', 'building')
if m[2] ~= ARGV[1] then return {'', ''} end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'current', ARGV[2], 'current_fp', ARGV[3])
redis.call('HDEL', KEYS[1], 'next')
if m[4] == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'building', 'building_key', 'building_fp', 'building_phase', 'building_overlay')
end
if ARGV[4] == '1' and m[3] and m[3] ~= ARGV[2] then redis.call('UNLINK', m[3]) end
return {m[1] or '', m[3] or ''}

-- The atomic flip. KEYS[1]: meta. ARGV: version, data key, fingerprint, then field, value pairs to
-- record. Returns {old version, old data key} ('' when there was none).
local m = redis.call('HMGET', KEYS[1], 'building', 'version', 'current')
if m[1] ~= ARGV[1] then return redis.error_reply('SUPERSEDED') end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'current', ARGV[2], 'current_fp', ARGV[3],
           'rows', redis.call('HLEN', ARGV[2]))
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
redis.call('HDEL', KEYS[1], 'building', 'building_key', 'building_fp', 'building_phase', 'building_overlay')
return {m[2] or '', m[3] or ''}

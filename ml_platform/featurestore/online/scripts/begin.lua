-- Start a full build. KEYS[1]: meta. ARGV: version, data key, overlay key, fingerprint, schema json.
-- Returns the keys of an unfinished earlier build, which the caller deletes (it is superseded).
local prev = redis.call('HMGET', KEYS[1], 'building_key', 'building_overlay', 'building')
redis.call('HSET', KEYS[1], 'building', ARGV[1], 'building_key', ARGV[2], 'building_overlay', ARGV[3],
           'building_fp', ARGV[4], 'building_phase', 'bulk', 'schema:' .. ARGV[1], ARGV[5])
if prev[3] then redis.call('HDEL', KEYS[1], 'schema:' .. prev[3]) end
return {prev[1] or '', prev[2] or ''}

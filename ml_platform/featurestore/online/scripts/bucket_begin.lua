-- Cluster: start a full build in one bucket. KEYS[1]: the bucket's ptr hash. ARGV: version, data
-- key, overlay key, fingerprint. An unfinished earlier build's keys in this bucket are deleted,
-- unless that version is live here (current, or `next`: flipped globally, not yet committed).
local prev = redis.call('HMGET', KEYS[1], 'building', 'building_key', 'building_overlay', 'version', 'next')
redis.call('HSET', KEYS[1], 'building', ARGV[1], 'building_key', ARGV[2], 'building_overlay', ARGV[3],
           'building_fp', ARGV[4], 'building_phase', 'bulk')
if prev[1] and prev[1] ~= ARGV[1] and prev[1] ~= prev[4] and prev[1] ~= prev[5] then
  redis.call('UNLINK', prev[2], prev[3])
end
return 1

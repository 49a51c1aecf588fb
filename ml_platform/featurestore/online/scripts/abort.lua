-- A failed build cleans up after itself. KEYS[1]: meta (or, on a cluster, a bucket's ptr hash);
-- ARGV: version, then the data key and overlay key to delete (none for a cluster's global meta,
-- whose data lives in the buckets).
if redis.call('HGET', KEYS[1], 'building') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'building', 'building_key', 'building_fp', 'building_phase', 'building_overlay')
end
if redis.call('HGET', KEYS[1], 'next') == ARGV[1] then redis.call('HDEL', KEYS[1], 'next') end
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
  redis.call('HDEL', KEYS[1], 'schema:' .. ARGV[1])
  if ARGV[2] then redis.call('UNLINK', ARGV[2], ARGV[3]) end
end
return 1

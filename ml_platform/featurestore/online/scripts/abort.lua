-- A failed build cleans up after itself. KEYS[1]: meta; ARGV: version, data key, overlay key.
if redis.call('HGET', KEYS[1], 'building') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'building', 'building_key', 'building_fp', 'building_phase', 'building_overlay')
end
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
  redis.call('HDEL', KEYS[1], 'schema:' .. ARGV[1])
  redis.call('UNLINK', ARGV[2], ARGV[3])
end
return 1

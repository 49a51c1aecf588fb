-- Newer-wins upsert into the current version (and the version being built, if any).
-- KEYS[1]: meta hash. ARGV[1]: schema fingerprint of the encoded values; then field, value pairs.
-- (newer_wins.lua is prepended.)
local m = redis.call('HMGET', KEYS[1], 'current', 'current_fp', 'building_key', 'building_fp',
                     'building_phase', 'building_overlay')
if not m[1] then return redis.error_reply('NOT_MATERIALIZED') end
if m[2] ~= ARGV[1] then return redis.error_reply('SCHEMA_MISMATCH ' .. tostring(m[2])) end
local written = newer_wins(m[1], 2)
if m[3] and m[4] == ARGV[1] then
  if m[5] == 'bulk' then newer_wins(m[6], 2) else newer_wins(m[3], 2) end
end
return written

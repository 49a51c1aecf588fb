-- Shared by upsert.lua and merge.lua (prepended to them at load time).
-- Newer-wins write of the field/value pairs ARGV[first..] into hash `key`; one HMGET and one HSET
-- per 4000 entities. A value wins if its event time (first 8 bytes, int64 microseconds) is >= the stored one;
-- within the batch the newest value per entity wins (the later one on a tie).
local function newer_wins(key, first)
  local best, order = {}, {}
  for i = first, #ARGV, 2 do
    local f = ARGV[i]
    local ts = struct.unpack('<i8', ARGV[i + 1])
    local b = best[f]
    if not b then
      order[#order + 1] = f
      best[f] = {i + 1, ts}
    elseif ts >= b[2] then
      best[f] = {i + 1, ts}
    end
  end
  local written = 0
  local s = 1
  while s <= #order do
    local e = math.min(s + 3999, #order)
    local olds = redis.call('HMGET', key, unpack(order, s, e))
    local args = {}
    for j = s, e do
      local f = order[j]
      local old = olds[j - s + 1]
      if (not old) or struct.unpack('<i8', old) <= best[f][2] then
        args[#args + 1] = f
        args[#args + 1] = ARGV[best[f][1]]
      end
    end
    if #args > 0 then redis.call('HSET', key, unpack(args)) end
    written = written + #args / 2
    s = e + 1
  end
  return written
end

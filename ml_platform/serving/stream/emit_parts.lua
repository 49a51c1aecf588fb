-- The stream worker's emit, in parts: the functions the emit scripts are made of
-- (ml_platform/serving/stream/emit.py prepends this file to `emit.lua`, and on a Redis Cluster
-- whose streams are in different slots to `emit_outputs.lua` and `emit_dead.lua`).
--
-- Input blobs: length-prefixed (u32) strings, one item after the other (packed blobs, not
-- thousands of arguments: argument packing was the client's main cost).
local function items(blob, n)
  local pos = 1
  return function()
    if pos > #blob then return nil end
    local out = {}
    for f = 1, n do
      local len
      len, pos = struct.unpack('<I4', blob, pos)
      out[f] = string.sub(blob, pos, pos + len - 1)
      pos = pos + len
    end
    return out
  end
end

-- predictions: entry id, done key, event id, prediction JSON, decision summary
--   (SET the done key to the summary NX, XADD the JSON to `output` only if it was set);
-- labels: entry id, done key (SET NX). Every entry id is appended to `acks`.
-- Returns predictions written, duplicates.
local function emit_outputs(output, ttl, maxlen, predictions, labels, acks)
  local written, dupes = 0, 0
  for it in items(predictions, 5) do
    if redis.call('SET', it[2], it[5], 'NX', 'EX', ttl) then
      if maxlen > 0 then
        redis.call('XADD', output, 'MAXLEN', '~', maxlen, '*', 'event_id', it[3], 'prediction', it[4])
      else
        redis.call('XADD', output, '*', 'event_id', it[3], 'prediction', it[4])
      end
      written = written + 1
    else
      dupes = dupes + 1
    end
    acks[#acks + 1] = it[1]
  end
  for it in items(labels, 2) do
    if not redis.call('SET', it[2], '1', 'NX', 'EX', ttl) then dupes = dupes + 1 end
    acks[#acks + 1] = it[1]
  end
  return written, dupes
end

-- dead letters: entry id, reason, payload (XADD to `stream`). `guard`: '' (one node: the emit is
-- one script, acknowledged in it), or a key prefix: the dead letter is written only if
-- SET <guard><entry id> NX succeeds, so an entry replayed after its dead letter was written but
-- before its XACK is not dead-lettered twice. Returns dead letters written.
local function emit_dead(stream, consumer, blob, acks, guard, ttl)
  local dead = 0
  for it in items(blob, 3) do
    if guard == '' or redis.call('SET', guard .. it[1], '1', 'NX', 'EX', ttl) then
      redis.call('XADD', stream, '*', 'input_id', it[1], 'reason', it[2], 'payload', it[3], 'consumer', consumer)
      dead = dead + 1
    end
    acks[#acks + 1] = it[1]
  end
  return dead
end

-- XACK `acks` on `stream` for `group`, 500 ids per call.
local function ack(stream, group, acks)
  for s = 1, #acks, 500 do
    redis.call('XACK', stream, group, unpack(acks, s, math.min(s + 499, #acks)))
  end
end

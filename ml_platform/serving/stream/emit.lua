-- The stream worker's emit: a batch's decisions, predictions, dead letters and acknowledgements
-- in one atomic script (ml_platform/serving/stream/emit.py loads it once and packs its input).
--
-- KEYS[1] input stream, KEYS[2] output stream, KEYS[3] dead-letter stream.
-- ARGV[1] group, ARGV[2] done-key TTL (s), ARGV[3] output MAXLEN (0 = unbounded), ARGV[4] consumer;
-- ARGV[5..8]: four blobs of length-prefixed (u32) strings, one item after the other:
--   predictions: entry id, done key, event id, prediction JSON, decision summary
--                (SET done key to the summary NX, XADD the JSON only if it was set, XACK)
--   labels:      entry id, done key                              (SET NX, XACK)
--   dead:        entry id, reason, payload                       (XADD dead letter, XACK)
--   acks:        entry id                                        (XACK)
-- (Packed blobs, not thousands of arguments: argument packing was the client's main cost.)
-- Returns {predictions written, duplicates, dead letters}.
local group, ttl, maxlen, consumer = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local written, dupes, dead = 0, 0, 0
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
local acks = {}
for it in items(ARGV[5], 5) do
  if redis.call('SET', it[2], it[5], 'NX', 'EX', ttl) then
    if maxlen > 0 then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'event_id', it[3], 'prediction', it[4])
    else
      redis.call('XADD', KEYS[2], '*', 'event_id', it[3], 'prediction', it[4])
    end
    written = written + 1
  else
    dupes = dupes + 1
  end
  acks[#acks + 1] = it[1]
end
for it in items(ARGV[6], 2) do
  if not redis.call('SET', it[2], '1', 'NX', 'EX', ttl) then dupes = dupes + 1 end
  acks[#acks + 1] = it[1]
end
for it in items(ARGV[7], 3) do
  redis.call('XADD', KEYS[3], '*', 'input_id', it[1], 'reason', it[2], 'payload', it[3], 'consumer', consumer)
  acks[#acks + 1] = it[1]
  dead = dead + 1
end
for it in items(ARGV[8], 1) do
  acks[#acks + 1] = it[1]
end
-- acknowledged last, after every output and dead letter of the batch is written
for s = 1, #acks, 500 do
  redis.call('XACK', KEYS[1], group, unpack(acks, s, math.min(s + 499, #acks)))
end
return {written, dupes, dead}

-- The stream worker's emit: a batch's decisions, predictions, dead letters and acknowledgements
-- in one atomic script (ml_platform/serving/stream/emit.py loads it once, after emit_parts.lua,
-- and packs its input). Run on one node, and on a Redis Cluster whose three streams and `done`
-- keys share one slot.
--
-- KEYS[1] input stream, KEYS[2] output stream, KEYS[3] dead-letter stream.
-- ARGV[1] group, ARGV[2] done-key TTL (s), ARGV[3] output MAXLEN (0 = unbounded), ARGV[4] consumer;
-- ARGV[5..8]: four blobs (see emit_parts.lua):
--   predictions: entry id, done key, event id, prediction JSON, decision summary
--                (SET done key to the summary NX, XADD the JSON only if it was set, XACK)
--   labels:      entry id, done key                              (SET NX, XACK)
--   dead:        entry id, reason, payload                       (XADD dead letter, XACK)
--   acks:        entry id                                        (XACK)
-- Returns {predictions written, duplicates, dead letters}.
local group, ttl, maxlen, consumer = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local acks = {}
local written, dupes = emit_outputs(KEYS[2], ttl, maxlen, ARGV[5], ARGV[6], acks)
local dead = emit_dead(KEYS[3], consumer, ARGV[7], acks, '', ttl)
for it in items(ARGV[8], 1) do
  acks[#acks + 1] = it[1]
end
-- acknowledged last, after every output and dead letter of the batch is written
ack(KEYS[1], group, acks)
return {written, dupes, dead}

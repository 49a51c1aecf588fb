-- Redis Cluster, the output stream's slot (the `done` keys carry its hash tag): a batch's
-- decisions and predictions, atomically. The worker acknowledges the entries after this script
-- and emit_dead.lua returned (emit.py). See emit_parts.lua for the blobs.
--
-- KEYS[1] output stream; ARGV[1] done-key TTL (s), ARGV[2] output MAXLEN (0 = unbounded),
-- ARGV[3] predictions, ARGV[4] labels. Returns {predictions written, duplicates}.
local written, dupes = emit_outputs(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], {})
return {written, dupes}

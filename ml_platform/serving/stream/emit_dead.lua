-- Redis Cluster, the dead-letter stream's slot: a batch's dead letters, each input entry at most
-- once (its guard key carries the stream's hash tag). See emit_parts.lua.
--
-- KEYS[1] dead-letter stream; ARGV[1] consumer, ARGV[2] guard key prefix, ARGV[3] guard TTL (s),
-- ARGV[4] dead letters. Returns the dead letters written.
return emit_dead(KEYS[1], ARGV[1], ARGV[4], {}, ARGV[2], ARGV[3])

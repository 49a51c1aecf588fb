-- Cluster: the bucket's part of version ARGV[1] is complete (bulk load and overlay merged, kept up
-- to date by upserts since the merge phase): readers may now read it here. KEYS[1]: ptr hash.
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return redis.error_reply('SUPERSEDED') end
redis.call('HSET', KEYS[1], 'next', ARGV[1])
return 1

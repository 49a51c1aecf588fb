"""The experiments store's Lua scripts (store.py runs them): every update of an experiment's
evidence is one script, atomic in Redis, so two processes rewarding the same arm never lose a count.

`FEEDBACK` (one node) reads the decision and applies its reward in one script; on Redis Cluster
the decision is read first and `CLUSTER_FEEDBACK` applies a batch of one experiment's rewards in
the experiments' slot, refusing a decision rewarded before by its marker key (keys.py).
"""

from __future__ import annotations

# Decay every arm's evidence (discount < 1), then add the reward to the arm that served.
APPLY = """
local function apply(post, counts, arm, reward, discount)
  if discount < 1 then
    local all = redis.call('HGETALL', post)
    for i = 1, #all, 2 do
      redis.call('HSET', post, all[i], tonumber(all[i + 1]) * discount)
    end
  end
  redis.call('HINCRBYFLOAT', post, arm .. ':s', reward)
  redis.call('HINCRBYFLOAT', post, arm .. ':f', 1 - reward)
  redis.call('HINCRBY', counts, arm .. ':n', 1)
  redis.call('HINCRBYFLOAT', counts, arm .. ':sum', reward)
end
"""

# A reward accepted (applied and counted) or refused as a duplicate (counted).
OUTCOMES = """
local function accept(exp, post, counts, arm, reward)
  local discount = tonumber(redis.call('HGET', exp, 'discount') or '1')
  apply(post, counts, arm, reward, discount)
  redis.call('HINCRBY', counts, 'feedback:accepted', 1)
end
local function refuse(counts)
  redis.call('HINCRBY', counts, 'feedback:duplicate', 1)
end
"""

# One node. KEYS[1] the decision; ARGV: reward, "<project>:experiment:" -> arm, or why not
FEEDBACK = (
    APPLY
    + OUTCOMES
    + """
local d = redis.call('HMGET', KEYS[1], 'e', 'a', 'r')
if not d[1] then return {'unknown', ''} end
local base = ARGV[2] .. d[1]
if d[3] then
  refuse(base .. ':counts')
  return {'duplicate', d[2]}
end
redis.call('HSET', KEYS[1], 'r', ARGV[1])
accept(base, base .. ':posterior', base .. ':counts', d[2], tonumber(ARGV[1]))
return {'accepted', d[2]}
"""
)

# Redis Cluster, the experiments' slot: the rewards of one experiment's decisions (read from the
# decisions before). KEYS: experiment hash, posterior, counts, then each reward's marker; ARGV per
# reward: marker TTL (ms), arm, reward -> per reward 'accepted' or 'duplicate', in order.
CLUSTER_FEEDBACK = (
    APPLY
    + OUTCOMES
    + """
local out = {}
for i = 4, #KEYS do
  local j = (i - 4) * 3
  if redis.call('SET', KEYS[i], ARGV[j + 3], 'NX', 'PX', ARGV[j + 1]) then
    accept(KEYS[1], KEYS[2], KEYS[3], ARGV[j + 2], tonumber(ARGV[j + 3]))
    out[#out + 1] = 'accepted'
  else
    refuse(KEYS[3])
    out[#out + 1] = 'duplicate'
  end
end
return out
"""
)

# KEYS: posterior, counts, label-days; ARGV: day, discount, then arm, reward pairs -> applied or -1
LABEL_DAY = (
    APPLY
    + """
if redis.call('HSETNX', KEYS[3], ARGV[1], (#ARGV - 2) / 2) == 0 then return -1 end
local discount = tonumber(ARGV[2])
for i = 3, #ARGV, 2 do apply(KEYS[1], KEYS[2], ARGV[i], tonumber(ARGV[i + 1]), discount) end
return (#ARGV - 2) / 2
"""
)

# KEYS[1] sticky hash; ARGV: user, proposal pairs -> each user's arm|p (the first assignment wins)
STICK = """
local out = {}
for i = 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  out[#out + 1] = redis.call('HGET', KEYS[1], ARGV[i])
end
return out
"""

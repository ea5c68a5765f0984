local P, now, ttl = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for _, tid in ipairs(redis.call('ZRANGEBYSCORE', P..'lease_deadline', '-inf', now)) do
  local pid = redis.call('HGET', P..'lease_prompt', tid)
  local actor = redis.call('HGET', P..'leases', tid)
  redis.call('LPUSH', P..'prompts', pid)
  redis.call('HDEL', P..'leases', tid)
  redis.call('HDEL', P..'lease_prompt', tid)
  redis.call('ZREM', P..'lease_deadline', tid)
  redis.call('SREM', P..'actor:'..actor, tid)
  local held = discard_pieces(P, tid)
  if held > 0 then
    redis.call('HINCRBY', P..'counters', 'discarded_partial_trees', 1)
    redis.call('HINCRBY', P..'counters', 'discarded_pieces', held)
  end
  redis.call('SET', P..'gone:'..tid, 'expired', 'EX', ttl)
  redis.call('HINCRBY', P..'counters', 'expired_leases', 1)
  out[#out + 1] = tid
  out[#out + 1] = actor
  out[#out + 1] = held
end
return out

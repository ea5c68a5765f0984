local P, actor, n, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out = {}
for i = 1, n do
  local pid = redis.call('LPOP', P..'prompts')
  if not pid then break end
  local tid = pid..'@'..redis.call('HINCRBY', P..'counters', 'leases_granted', 1)
  redis.call('HSET', P..'leases', tid, actor)
  redis.call('HSET', P..'lease_prompt', tid, pid)
  redis.call('ZADD', P..'lease_deadline', deadline, tid)
  redis.call('SADD', P..'actor:'..actor, tid)
  out[#out + 1] = tid
  out[#out + 1] = pid
end
return out

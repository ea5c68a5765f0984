local P, actor, deadline = ARGV[1], ARGV[2], ARGV[3]
local tids = redis.call('SMEMBERS', P..'actor:'..actor)
for _, tid in ipairs(tids) do redis.call('ZADD', P..'lease_deadline', 'XX', deadline, tid) end
return #tids

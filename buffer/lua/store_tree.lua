-- staged: the key holding the tree's blob; single = '1': the tree came as one new piece (admit it
-- against the cap and count the piece)
local P, tid, staged, v, cap, single = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local gone = redis.call('GET', P..'gone:'..tid)
local function refuse(counter, status)
  redis.call('DEL', staged) redis.call('HINCRBY', P..'counters', counter, 1) return status
end
if gone == 'expired' then return refuse('refused_expired', 'expired') end
if gone or redis.call('EXISTS', P..'tree:'..tid) == 1 then return refuse('duplicate_pieces', 'duplicate') end
if single == '1' and tonumber(redis.call('HGET', P..'counters', 'unconsumed') or '0') >= cap then
  return refuse('backpressure', 'backpressure')
end
redis.call('RENAME', staged, P..'tree:'..tid)
redis.call('PERSIST', P..'tree:'..tid)
redis.call('XADD', P..'stream', '*', 'tree', tid, 'v', v)
redis.call('ZADD', P..'by_version', v, tid)
redis.call('HINCRBY', P..'counters', 'trees_stored', 1)
redis.call('HINCRBY', P..'counters', 'unconsumed', 1)
if single == '1' then redis.call('HINCRBY', P..'counters', 'pieces_stored', 1) end
discard_pieces(P, tid)
local actor = redis.call('HGET', P..'leases', tid)
if actor then
  redis.call('HDEL', P..'leases', tid)
  redis.call('HDEL', P..'lease_prompt', tid)
  redis.call('ZREM', P..'lease_deadline', tid)
  redis.call('SREM', P..'actor:'..actor, tid)
  redis.call('HINCRBY', P..'counters', 'leases_completed', 1)
end
return 'stored'

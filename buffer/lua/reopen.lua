-- ARGV: P. A learner resumed from a checkpoint that does not hold the updates of the entries in P trained:
-- they are unconsumed again (their stream entries are still pending: they come again).
local P = ARGV[1]
local ids = redis.call('SMEMBERS', P..'trained')
for _, id in ipairs(ids) do
  redis.call('HINCRBY', P..'counters', 'unconsumed', 1)
  redis.call('HINCRBY', P..'counters', 'consumed', -1)
end
redis.call('DEL', P..'trained')
return #ids

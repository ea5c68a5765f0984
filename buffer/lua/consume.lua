-- ARGV: P, learner version, then entry ids. Trained, not yet acknowledged (that waits for the checkpoint that
-- holds the update): out of the admission count (unconsumed) and counted as consumed, once per entry.
local P, version = ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV do
  if redis.call('SADD', P..'trained', ARGV[i]) == 1 then
    n = n + 1
    redis.call('HINCRBY', P..'counters', 'unconsumed', -1)
    redis.call('HINCRBY', P..'counters', 'consumed', 1)
  end
end
redis.call('SET', P..'learner_version', version)
return n

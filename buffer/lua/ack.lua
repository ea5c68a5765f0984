-- ARGV: P, kind (counter to bump), retention, keep, tombstone ttl, learner version or '', then id/tree pairs.
-- An entry already counted by consume.lua (in P trained) is not counted again.
local P, kind, retention, keep, ttl, version = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local function drop(tid)
  redis.call('DEL', P..'tree:'..tid)
  redis.call('ZREM', P..'by_version', tid)
  redis.call('HDEL', P..'advantages', tid)
  redis.call('SET', P..'gone:'..tid, 'trimmed', 'EX', ttl)
end
local acked = 0
for i = 7, #ARGV, 2 do
  local id, tid = ARGV[i], ARGV[i + 1]
  local counted = redis.call('SREM', P..'trained', id) == 1
  if redis.call('XACK', P..'stream', 'learner', id) == 1 then
    acked = acked + 1
    redis.call('XDEL', P..'stream', id)
    if not counted then
      redis.call('HINCRBY', P..'counters', 'unconsumed', -1)
      redis.call('HINCRBY', P..'counters', kind, 1)
    end
    if retention == 'trim' then
      drop(tid)
    elseif retention == 'keep_last' then
      redis.call('RPUSH', P..'consumed', tid)
      while redis.call('LLEN', P..'consumed') > keep do drop(redis.call('LPOP', P..'consumed')) end
    end
  end
end
if version ~= '' then redis.call('SET', P..'learner_version', version) end
return acked

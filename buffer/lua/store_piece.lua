local P, tid, key, staged, n, cap = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local gone = redis.call('GET', P..'gone:'..tid)
local function refuse(counter, status)
  redis.call('DEL', staged) redis.call('HINCRBY', P..'counters', counter, 1) return {status, 0, 0}
end
if gone == 'expired' then return refuse('refused_expired', 'expired') end
if gone or redis.call('EXISTS', P..'tree:'..tid) == 1 then return refuse('duplicate_pieces', 'duplicate') end
local pk = P..'pieces:'..tid
local status = 'stored'
if redis.call('HEXISTS', pk, key) == 1 then
  redis.call('DEL', staged)
  redis.call('HINCRBY', P..'counters', 'duplicate_pieces', 1)
  status = 'duplicate'
else
  if tonumber(redis.call('HGET', P..'counters', 'unconsumed') or '0') >= cap then
    return refuse('backpressure', 'backpressure')
  end
  redis.call('HSET', pk, key, '1')
  redis.call('RENAME', staged, P..'piece:'..tid..':'..key)
  redis.call('PERSIST', P..'piece:'..tid..':'..key)
  redis.call('HINCRBY', P..'counters', 'pieces_stored', 1)
end
if n > 0 then redis.call('HSET', pk, '#n', n) end
local total = tonumber(redis.call('HGET', pk, '#n') or '0')
local held = redis.call('HLEN', pk)
if total > 0 then held = held - 1 end
return {status, held, total}

-- delete the held pieces of a tree; returns how many there were
local function discard_pieces(P, tid)
  local pk = P..'pieces:'..tid
  local held = 0
  for _, key in ipairs(redis.call('HKEYS', pk)) do
    if key ~= '#n' then redis.call('DEL', P..'piece:'..tid..':'..key) held = held + 1 end
  end
  redis.call('DEL', pk)
  return held
end

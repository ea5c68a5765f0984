-- ARGV: P, version. The highest policy version ever published in the run (monotonic).
local cur = tonumber(redis.call('GET', ARGV[1]..'version_high') or '-1')
if tonumber(ARGV[2]) > cur then redis.call('SET', ARGV[1]..'version_high', ARGV[2]) end
return redis.call('GET', ARGV[1]..'version_high')

-- Relay publish, atomic. All keys share the BizId's hash tag, so this runs in Redis Cluster.
-- KEYS[1] stream   <prefix>:{B}:log      history of B
-- KEYS[2] channel  <prefix>:{B}:ch       live pub/sub channel of B
-- KEYS[3] session  <prefix>:{B}:session  who holds B now (read only)
-- KEYS[4] dedupe   <prefix>:{B}:mid:<mid> (any key in B's slot when there is no mid)
-- ARGV[1] payload  MessagePack map {v=1, mid, biz, ev, data, ts}
-- ARGV[2] maxlen   history size (approximate trim, MAXLEN ~)
-- ARGV[3] ttl      seconds the history lives after the last publish
-- ARGV[4] mid      message id for idempotency, '' for none
-- ARGV[5] window   seconds a mid is remembered
-- Returns {id, receivers, online (0/1), duplicate (0/1)}.
local mid = ARGV[4]
if mid ~= '' then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    return {seen, 0, redis.call('EXISTS', KEYS[3]), 1}
  end
end
-- Each entry names its predecessor, so receivers can tell a gap from a duplicate.
local prev = '0-0'
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if newest[1] then prev = newest[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'p', ARGV[1], 'prev', prev)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if mid ~= '' then
  redis.call('SET', KEYS[4], id, 'EX', ARGV[5])
end
local receivers = redis.call('PUBLISH', KEYS[2], id .. ' ' .. prev .. ' ' .. ARGV[1])
local online = 0
if receivers > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  online = 1
end
return {id, receivers, online, 0}

-- Relay publish, atomic. All keys share the BizId's hash tag, so this runs in Redis Cluster.
-- KEYS[1] stream   <prefix>:{B}:log      history of B
-- KEYS[2] channel  <prefix>:{B}:ch       live pub/sub channel of B; the string key of the
--                                        same name holds the newest id of the stream
-- KEYS[3] session  <prefix>:{B}:session  who holds B now (read only)
-- KEYS[4] dedupe   <prefix>:{B}:mid:<mid> (any key in B's slot when there is no mid)
-- ARGV[1] payload  MessagePack map {v=1, mid, biz, ev, data, ts}
-- ARGV[2] maxlen   history size (approximate trim, MAXLEN ~)
-- ARGV[3] ttl      seconds the history lives after the last publish (at least)
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
-- The newest id is kept beside the stream. The stream's TTL says whether that is safe to
-- use: this script keeps it above ttl, so a TTL of at most ttl means the stream is new or
-- another writer (an older publish script, which sets exactly ttl) appended since.
local ttl_ms = tonumber(ARGV[3]) * 1000
local slack_ms = math.floor(ttl_ms / 4)
local left_ms = redis.call('PTTL', KEYS[1])
local prev = false
if left_ms > ttl_ms then
  prev = redis.call('GET', KEYS[2])
end
local kept = prev
if not prev then
  prev = '0-0'
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if newest[1] then prev = newest[1][1] end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'p', ARGV[1], 'prev', prev)
-- The newest-id key expires with or before the stream. Its TTL is set when the stream's
-- is (or when the key was missing) and kept otherwise: SET with KEEPTTL costs Redis less.
if left_ms <= ttl_ms + slack_ms then
  redis.call('PEXPIRE', KEYS[1], ttl_ms + 2 * slack_ms)
  redis.call('SET', KEYS[2], id, 'PX', ttl_ms + slack_ms)
elseif kept then
  redis.call('SET', KEYS[2], id, 'KEEPTTL')
else
  redis.call('SET', KEYS[2], id, 'PX', ttl_ms)
end
if mid ~= '' then
  redis.call('SET', KEYS[4], id, 'EX', ARGV[5])
end
local receivers = redis.call('SPUBLISH', KEYS[2], id .. ' ' .. prev .. ' ' .. ARGV[1])
local online = 0
if receivers > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  online = 1
end
return {id, receivers, online, 0}

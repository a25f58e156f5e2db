-- Relay publish of a run of events of one BizId, atomic: what publish.lua does for each
-- event in turn, with the newest id, the TTL and the online flag handled once per run.
-- KEYS[1] stream   <prefix>:{B}:log
-- KEYS[2] channel  <prefix>:{B}:ch (pub/sub channel; the string key holds the newest id)
-- KEYS[3] session  <prefix>:{B}:session (read only)
-- KEYS[3+i] dedupe of event i: <prefix>:{B}:mid:<mid> (any key in B's slot without a mid)
-- ARGV[1] maxlen, ARGV[2] ttl, ARGV[3] window: as ARGV[2], ARGV[3], ARGV[5] of publish.lua
-- ARGV[2+2i] payload of event i, ARGV[3+2i] its mid ('' for none)
-- Returns one {id, receivers, online (0/1), duplicate (0/1)} per event.
local ttl_ms = tonumber(ARGV[2]) * 1000
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
local online = nil
local function is_online()
  if online == nil then online = redis.call('EXISTS', KEYS[3]) end
  return online
end
local out, wrote = {}, false
for i = 1, #KEYS - 3 do
  local payload, mid = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local seen = mid ~= '' and redis.call('GET', KEYS[3 + i])
  if seen then
    out[i] = {seen, 0, is_online(), 1}
  else
    local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'p', payload, 'prev', prev)
    if mid ~= '' then
      redis.call('SET', KEYS[3 + i], id, 'EX', ARGV[3])
    end
    local receivers = redis.call('SPUBLISH', KEYS[2], id .. ' ' .. prev .. ' ' .. payload)
    out[i] = {id, receivers, receivers > 0 and is_online() or 0, 0}
    prev, wrote = id, true
  end
end
if wrote then  -- the newest-id key's TTL as in publish.lua
  if left_ms <= ttl_ms + slack_ms then
    redis.call('PEXPIRE', KEYS[1], ttl_ms + 2 * slack_ms)
    redis.call('SET', KEYS[2], prev, 'PX', ttl_ms + slack_ms)
  elseif kept then
    redis.call('SET', KEYS[2], prev, 'KEEPTTL')
  else
    redis.call('SET', KEYS[2], prev, 'PX', ttl_ms)
  end
end
return out

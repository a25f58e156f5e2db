-- Relay session claim. One key, so it runs in Redis Cluster too.
-- KEYS[1] record   <prefix>:{C}:session  the session record of client_id C
-- The record names the newest session (node, session, since, connected_at, last_ack,
-- attempt) and lists every live one as "s:<session> = <node>"; with duplicates replaced
-- that list has one entry.
-- ARGV[1] node  ARGV[2] session  ARGV[3] since  ARGV[4] connected_at
-- ARGV[5] '1' exclusive (forget every other session), '0' shared
-- ARGV[6] attempt "<instance>.<n>", '' for none
-- ARGV[7] the control channels' prefix "<prefix>:ctl:", '' for no kick
-- ARGV[8] client_id  ARGV[9] kick code  ARGV[10] kick reason
-- An exclusive claim that displaces an earlier attempt of the same instance held on
-- another node kicks it in the same call: PUBLISH of {"action": "kick", "client_id",
-- "session", "code", "reason"} to that node's control channel (what
-- RedisSessionRegistry.send_control sends). Only then: the client ended that attempt
-- before making this one, so it is never the client's live session, even if this claim's
-- own handshake was abandoned meanwhile. Any other displaced session is the node's to
-- kick, after the reply, if its session is still wanted.
-- Returns the record as it was (HGETALL), empty if there was none.
local old = redis.call('HGETALL', KEYS[1])
if ARGV[5] == '1' then
  -- A stale handshake never displaces a later one of the same client: a later attempt of
  -- the same instance ("<instance>.<n>"), or one that began later on the same node.
  local holder = redis.call('HMGET', KEYS[1], 'node', 'connected_at', 'attempt', 'session')
  local earlier = false  -- the holder is an earlier attempt of this claim's instance
  if holder[3] and ARGV[6] ~= '' then
    local hi, hn = string.match(holder[3], '^(.+)%.(%d+)$')
    local oi, on = string.match(ARGV[6], '^(.+)%.(%d+)$')
    if hi and oi and hi == oi then
      if tonumber(hn) > tonumber(on) then
        return old
      end
      earlier = tonumber(hn) < tonumber(on)
    end
  end
  if holder[1] == ARGV[1] and holder[2] and tonumber(holder[2]) > tonumber(ARGV[4]) then
    return old
  end
  redis.call('DEL', KEYS[1])
  if earlier and ARGV[7] ~= '' and holder[1] ~= ARGV[1] and holder[4] then
    redis.call('PUBLISH', ARGV[7] .. holder[1], cjson.encode({
      action = 'kick', client_id = ARGV[8], session = holder[4],
      code = tonumber(ARGV[9]), reason = ARGV[10], token = ''}))
  end
end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'session', ARGV[2], 'since', ARGV[3],
           'connected_at', ARGV[4], 's:' .. ARGV[2], ARGV[1])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'attempt', ARGV[6])
else
  redis.call('HDEL', KEYS[1], 'attempt')
end
return old

-- Relay: forget sessions in one session record. One key, so it runs in Redis Cluster too.
-- KEYS[1] record   <prefix>:{C}:session
-- ARGV[1] 'session' forgets session ARGV[2] (a release),
--         'node' every session of node ARGV[2] (reaping a dead node).
-- If the record named what was forgotten, it is handed to another live session, or
-- deleted. Returns 1 if it was named, else 0.
-- A release may name the holder its session's claim displaced, to be put back instead
-- (the claim of a handshake abandoned while it was in flight):
-- ARGV[3] node  ARGV[4] session  ARGV[5] since  ARGV[6] connected_at  ARGV[7] attempt
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, 1, 2) == 's:' and
     ((ARGV[1] == 'session' and string.sub(f, 3) == ARGV[2]) or
      (ARGV[1] == 'node' and all[i + 1] == ARGV[2])) then
    redis.call('HDEL', KEYS[1], f)
  end
end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if ARGV[4] then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'node', ARGV[3], 'session', ARGV[4], 'since', ARGV[5],
             'connected_at', ARGV[6], 's:' .. ARGV[4], ARGV[3])
  if ARGV[7] ~= '' then
    redis.call('HSET', KEYS[1], 'attempt', ARGV[7])
  end
  return 1
end
local rest = redis.call('HGETALL', KEYS[1])
for i = 1, #rest, 2 do
  if string.sub(rest[i], 1, 2) == 's:' then
    redis.call('HSET', KEYS[1], 'session', string.sub(rest[i], 3), 'node', rest[i + 1])
    return 1
  end
end
redis.call('DEL', KEYS[1])
return 1

-- Relay: store the last id a session acknowledged, only if it still holds the record.
-- KEYS[1] record   <prefix>:{C}:session
-- ARGV[1] session  ARGV[2] message id
-- Returns 1 if stored, else 0.
if redis.call('HGET', KEYS[1], 'session') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'last_ack', ARGV[2])
  return 1
end
return 0

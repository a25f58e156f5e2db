-- Relay: the dataset's epoch, the Redis clock when Relay first saw this dataset. A restart
-- without persistence or a FLUSHALL deletes it, so history older than it cannot be vouched
-- for.
-- KEYS[1] epoch    <prefix>:epoch
-- Returns the epoch in milliseconds.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], string.format('%.0f', now_ms), 'NX')
return tonumber(redis.call('GET', KEYS[1]))

-- Relay publish of single events of several BizIds in one call: publish.lua for each event
-- in turn, so Redis pays the per-call script cost once per call instead of once per event.
-- backend_adapter's pipelines use it; publish.lua stays the contract for other backends.
-- relay.wire puts publish.lua's text in place of the line "-- <publish.lua>" below, as the
-- body of publish(), with KEYS[n] read as KEYS[k + n] and ARGV[1..5] as payload, ARGV[1],
-- ARGV[2], mid, ARGV[3] (the SHA is of the result): the two cannot drift apart.
-- Event i (from 1): KEYS[4i-3..4i] its stream, channel, session and dedupe keys (KEYS[1..4]
-- of publish.lua); ARGV[2+2i] its payload and ARGV[3+2i] its mid ('' for none).
-- ARGV[1] maxlen, ARGV[2] ttl, ARGV[3] window: as ARGV[2], ARGV[3], ARGV[5] of publish.lua.
-- Every key is declared, so a Redis Cluster runs a call whose keys share a slot.
-- Returns one {id, receivers, online (0/1), duplicate (0/1)} per event, or that event's
-- error (a key of the wrong type, say): one event's failure leaves the others as they are.
local function publish(k, payload, mid)
-- <publish.lua>
end

local out = {}
for i = 1, #KEYS / 4 do
  local ok, reply = pcall(publish, 4 * i - 4, ARGV[2 + 2 * i], ARGV[3 + 2 * i])
  if not ok and type(reply) ~= 'table' then  -- a Lua error rather than a Redis one
    reply = redis.error_reply(tostring(reply))
  end
  out[i] = reply
end
return out

-- Relay publish of single events of several BizIds in one call: publish.lua for each event
-- in turn, so Redis pays the per-call script cost once per call instead of once per event.
-- backend_adapter's pipelines use it; publish.lua stays the contract for other backends.
-- relay.wire puts publish.lua's text in place of the line "-- <publish.lua>" below, as the
-- body of publish(), with KEYS[n] read as KEYS[k + n], ARGV[1..5] as payload, ARGV[1],
-- ARGV[2], mid, ARGV[3], each `return {a, b, c, d}` as `return a, b, c, d` and
-- redis.call as call; its two lines of TTL arithmetic move to the line
-- "-- <publish.lua: settings>", run once per call (the SHA is of the result): the two
-- cannot drift apart.
-- Event i (from 1): KEYS[4i-3..4i] its stream, channel, session and dedupe keys (KEYS[1..4]
-- of publish.lua); ARGV[2+2i] its payload and ARGV[3+2i] its mid ('' for none).
-- ARGV[1] maxlen, ARGV[2] ttl, ARGV[3] window: as ARGV[2], ARGV[3], ARGV[5] of publish.lua.
-- Every key is declared, so a Redis Cluster runs a call whose keys share a slot.
-- Returns one flat array, four elements per event: id, receivers, online (0/1), duplicate
-- (0/1); or that event's error (a key of the wrong type, say) and 0, 0, 0: one event's
-- failure leaves the others as they are. Flat because a table per event cost Redis ~4,300
-- instructions an event (7 % of the call; callgrind, docs/benchmarks.md): building it,
-- then checking it for err, ok, double, map, set... to turn it into its reply.
local call = redis.call
-- <publish.lua: settings>
local function publish(k, payload, mid)
-- <publish.lua>
end

local out = {}
for i = 1, #KEYS / 4 do
  local ok, id, receivers, online, duplicate =
    pcall(publish, 4 * i - 4, ARGV[2 + 2 * i], ARGV[3 + 2 * i])
  if not ok then
    if type(id) ~= 'table' then  -- a Lua error rather than a Redis one
      id = redis.error_reply(tostring(id))
    end
    receivers, online, duplicate = 0, 0, 0
  end
  out[4 * i - 3], out[4 * i - 2], out[4 * i - 1], out[4 * i] = id, receivers, online, duplicate
end
return out

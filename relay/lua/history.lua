-- Relay history read: one consistent snapshot of a BizId's stream.
-- KEYS[1] stream  <prefix>:{B}:log
-- ARGV[1] since   stream id; entries after it are returned ('' for none)
-- ARGV[2] limit   at most this many entries; if more exist, the newest `limit` are returned
-- Returns {now_ms} when the stream does not exist, else
--         {now_ms, first_id, first_prev, last_id, truncated (0/1), id1, prev1, payload1, ...}
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if not first[1] then
  return {now_ms}
end
local function field(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return '0-0'
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local out = {now_ms, first[1][1], field(first[1], 'prev'), last[1][1], 0}
if ARGV[1] ~= '' then
  local limit = tonumber(ARGV[2])
  local entries = redis.pcall('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', limit + 1)
  if type(entries) ~= 'table' or entries.err then
    entries = {}
  end
  if #entries > limit then
    out[5] = 1
    local newest = redis.call('XREVRANGE', KEYS[1], '+', '(' .. ARGV[1], 'COUNT', limit)
    entries = {}
    for i = #newest, 1, -1 do
      entries[#entries + 1] = newest[i]
    end
  end
  for _, e in ipairs(entries) do
    out[#out + 1] = e[1]
    out[#out + 1] = field(e, 'prev')
    out[#out + 1] = field(e, 'p')
  end
end
return out

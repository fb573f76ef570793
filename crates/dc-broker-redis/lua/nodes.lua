-- nodes: nodes heard from within ARGV[1] ms, by the server's clock, with their last status.
-- KEYS[1] node registry ZSET.
-- ARGV: 1 window ms, 2 node status key prefix.
-- Returns {now ms, {node, last heartbeat ms, status CBOR or nil}...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = { now }
local seen = redis.pcall('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf', 'WITHSCORES')
if seen.err then
  damaged(KEYS[1] .. ' is not a sorted set')
  seen = {}
end
for i = 1, #seen, 2 do
  local status = redis.pcall('GET', ARGV[2] .. seen[i])
  if type(status) ~= 'string' then
    status = false
  end
  table.insert(out, { seen[i], tonumber(seen[i + 1]), status })
end
return out

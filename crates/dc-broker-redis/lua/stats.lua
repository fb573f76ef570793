-- stats: a session's job counters and problems, and the last status of every node heard from
-- within the session's lease (the server's clock decides who is live).
-- KEYS[1] session meta, KEYS[2] node registry ZSET.
-- ARGV: 1 session key base, 2 node status key prefix.
-- Returns {queued, running, done, failed, {problem CBOR...}, {node status CBOR...}}.
-- Error DCGONE when the session does not exist.
local broken = session_error(KEYS[1], ARGV[1])
if broken then
  return broken
end
local m = redis.call('HMGET', KEYS[1], 'q', 'r', 'd', 'f', 'lease')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local statuses = {}
local nodes = redis.pcall('ZRANGEBYSCORE', KEYS[2], now - count(m[5]), '+inf')
if nodes.err then
  damaged(KEYS[2] .. ' is not a sorted set')
  nodes = {}
end
for _, node in ipairs(nodes) do
  local s = redis.pcall('GET', ARGV[2] .. node)
  if type(s) == 'string' then
    table.insert(statuses, s)
  end
end
local problems = redis.pcall('LRANGE', ARGV[1] .. 'problems', 0, -1)
if problems.err then
  damaged(ARGV[1] .. 'problems is not a list')
  problems = {}
end
-- A damaged counter reads as 0 (the next change to it resets it).
local function n(v)
  return tonumber(v) and math.floor(tonumber(v)) or 0
end
return { n(m[1]), n(m[2]), n(m[3]), n(m[4]), problems, statuses }

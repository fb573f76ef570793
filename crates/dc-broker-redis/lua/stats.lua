-- stats: a session's job counters and problems, and the last status of every node heard from
-- within the session's lease (the server's clock decides who is live).
-- KEYS[1] session meta, KEYS[2] node registry ZSET.
-- ARGV: 1 session key base, 2 node status key prefix.
-- Returns {queued, running, done, failed, {problem CBOR...}, {node status CBOR...}}.
-- Error DCGONE when the session does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('DCGONE session is gone')
end
local m = redis.call('HMGET', KEYS[1], 'q', 'r', 'd', 'f', 'lease')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local statuses = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now - tonumber(m[5]), '+inf')) do
  local s = redis.call('GET', ARGV[2] .. node)
  if s then
    table.insert(statuses, s)
  end
end
local problems = redis.call('LRANGE', ARGV[1] .. 'problems', 0, -1)
return { tonumber(m[1]), tonumber(m[2]), tonumber(m[3]), tonumber(m[4]), problems, statuses }

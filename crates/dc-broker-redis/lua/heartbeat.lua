-- heartbeat: register or refresh node ARGV[1] with its status, stamped with the server's clock;
-- forget nodes silent for longer than the status TTL. (Leases are renewed by renew.lua.)
-- KEYS[1] node registry ZSET, KEYS[2] the node's status key.
-- ARGV: 1 node, 2 status (CBOR), 3 status TTL ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
repair(KEYS[1], 'zset')
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
return now

-- open_session: make ARGV[1] the active session if none is, and create its keys.
-- KEYS[1] active pointer, KEYS[2] sessions ZSET, KEYS[3] "opened" stream, KEYS[4] session meta.
-- ARGV: 1 session id, 2 session key base "<prefix>:{<sid>}:", 3 lease ms, 4 max attempts,
--       5 key TTL ms, 6 spec mode ("i" inline / "s" staged under <base>spec already),
--       7 inline spec CBOR, 8 spec chunk count, 9 spec length.
-- Returns 1 when opened, 0 when another session is active.
repair(KEYS[1], 'string')
repair(KEYS[2], 'zset')
repair(KEYS[3], 'stream')
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then
  return 0
end
local base = ARGV[2]
redis.call('HSET', KEYS[4], 'lease', ARGV[3], 'max', ARGV[4], 'q', 0, 'r', 0, 'd', 0, 'f', 0,
  'sn', ARGV[8], 'slen', ARGV[9])
if ARGV[6] == 'i' then
  redis.call('HSET', base .. 'spec', 'c0', ARGV[7])
end
redis.call('XGROUP', 'CREATE', base .. 'jobs', 'w', '$', 'MKSTREAM')
for _, k in ipairs({ 'meta', 'spec', 'jobs' }) do
  redis.call('PEXPIRE', base .. k, ARGV[5])
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 64, '*', 's', ARGV[1])
return 1

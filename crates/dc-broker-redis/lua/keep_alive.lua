-- keep_alive: renew the active pointer of session ARGV[1] and the TTL of its long-lived keys.
-- KEYS[1] active pointer, KEYS[2] session meta.
-- ARGV: 1 session id, 2 session key base, 3 key TTL ms, then (from the client that opened the
--       session) what it set: 4 lease ms, 5 attempt limit, 6 spec chunk count, 7 spec length.
-- Returns 1 while the session is the active one, 0 once it expired, closed or was replaced,
-- or when its meta is damaged (then the active pointer is released, so that its pool can open
-- a new session at once instead of waiting out a lease it can no longer trust).
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local broken = session_error(KEYS[2], ARGV[2])
if not broken and ARGV[4] then
  local m = redis.call('HMGET', KEYS[2], 'lease', 'max', 'sn', 'slen')
  local spec = ARGV[2] .. 'spec'
  local chunks = redis.pcall('HLEN', spec)
  if m[1] ~= ARGV[4] or m[2] ~= ARGV[5] or m[3] ~= ARGV[6] or m[4] ~= ARGV[7] then
    damaged(KEYS[2] .. ' holds values its pool never set: the session is treated as gone')
    broken = true
  elseif chunks ~= tonumber(ARGV[6])
      or (chunks == 1 and redis.call('HSTRLEN', spec, 'c0') ~= tonumber(ARGV[7])) then
    -- Nodes could not read the spec to start workers.
    damaged(spec .. ' is damaged: the session is treated as gone')
    broken = true
  end
end
if broken then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[4] or count(redis.call('HGET', KEYS[2], 'lease')))
for _, k in ipairs({ 'meta', 'spec', 'jobs', 'upd', 'results', 'problems', 'pset' }) do
  redis.call('PEXPIRE', ARGV[2] .. k, ARGV[3])
end
return 1

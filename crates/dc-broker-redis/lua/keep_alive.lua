-- keep_alive: renew the active pointer of session ARGV[1] and the TTL of its long-lived keys.
-- KEYS[1] active pointer, KEYS[2] session meta.
-- ARGV: 1 session id, 2 session key base, 3 key TTL ms.
-- Returns 1 while the session is the active one, 0 once it expired, closed or was replaced.
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] or session_error(KEYS[2], ARGV[2]) then
  return 0
end
redis.call('PEXPIRE', KEYS[1], count(redis.call('HGET', KEYS[2], 'lease')))
for _, k in ipairs({ 'meta', 'spec', 'jobs', 'upd', 'results', 'problems', 'pset' }) do
  redis.call('PEXPIRE', ARGV[2] .. k, ARGV[3])
end
return 1

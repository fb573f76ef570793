-- close_session: end session ARGV[1]: drop the active pointer (if it is this session), its
-- registry entry and its fixed keys. Per-job keys are then removed by the client with SCAN.
-- KEYS[1] active pointer, KEYS[2] sessions ZSET.
-- ARGV: 1 session id, 2 session key base, 3 "1" to close only when not active (the reaper).
-- Returns 1 when closed, 0 when left alone.
local active = redis.call('GET', KEYS[1])
if ARGV[3] == '1' and active == ARGV[1] then
  return 0
end
if active == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
for _, k in ipairs({ 'meta', 'spec', 'jobs', 'upd', 'results', 'problems', 'pset' }) do
  redis.call('UNLINK', ARGV[2] .. k)
end
return 1

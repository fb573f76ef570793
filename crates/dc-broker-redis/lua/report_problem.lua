-- report_problem: record a node's problem with a session once (deduplicated by its encoding).
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 problem (CBOR).
-- Returns 1 when new, 0 when already known. Error DCGONE when the session does not exist.
local broken = session_error(KEYS[1], ARGV[1])
if broken then
  return broken
end
repair(ARGV[1] .. 'pset', 'set')
repair(ARGV[1] .. 'problems', 'list')
if redis.call('SADD', ARGV[1] .. 'pset', ARGV[2]) == 1 then
  redis.call('RPUSH', ARGV[1] .. 'problems', ARGV[2])
  return 1
end
return 0

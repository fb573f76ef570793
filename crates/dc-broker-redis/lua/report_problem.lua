-- report_problem: record a node's problem with a session once (deduplicated by its encoding).
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 problem (CBOR).
-- Returns 1 when new, 0 when already known. Error DCGONE when the session does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('DCGONE session is gone')
end
if redis.call('SADD', ARGV[1] .. 'pset', ARGV[2]) == 1 then
  redis.call('RPUSH', ARGV[1] .. 'problems', ARGV[2])
  return 1
end
return 0

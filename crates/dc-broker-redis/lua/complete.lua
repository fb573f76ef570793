-- complete: commit an attempt's outcome, first writer wins: only while the job is still
-- leased under this attempt, entry and node; then ack and delete the entry, free the payload
-- and tell the pool through the results stream.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 job id, 3 attempt, 4 entry id, 5 node, 6 attempt record (CBOR),
--       7 "d" (done) or "f" (failed), 8 failure kind (CBOR) or "", 9 message, 10 chunk count,
--       11 length, 12 mode ("i" inline in ARGV[13], "s" ARGV[13] names a staged chunk hash,
--       "n" no output), 13 output or staged key.
-- Returns 1 when accepted, 0 when discarded. Error DCGONE when the session does not exist.
local base = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[12] == 's' then
    redis.call('UNLINK', ARGV[13])
  end
  return redis.error_reply('DCGONE session is gone')
end
local jid = ARGV[2]
local job = base .. 'job:' .. jid
local s = redis.call('HMGET', job, 'st', 'att', 'e', 'node')
if not (s[1] == 'l' and s[2] == ARGV[3] and s[3] == ARGV[4] and s[4] == ARGV[5]) then
  if ARGV[12] == 's' then
    redis.call('UNLINK', ARGV[13])
  end
  return 0
end
local out = base .. 'out:' .. jid
redis.call('UNLINK', out)
if ARGV[12] == 's' then
  redis.call('RENAME', ARGV[13], out)
  redis.call('PERSIST', out)
elseif ARGV[12] == 'i' then
  redis.call('HSET', out, 'c0', ARGV[13])
end
redis.call('HSET', out, 'k', ARGV[7], 'fk', ARGV[8], 'a', s[2], 'm', ARGV[9], 'n', ARGV[10], 'len', ARGV[11])
if ARGV[7] == 'f' then
  redis.call('RPUSH', base .. 'hist:' .. jid, ARGV[6])
  redis.call('HSET', job, 'st', 'f')
  redis.call('HINCRBY', KEYS[1], 'f', 1)
else
  redis.call('UNLINK', base .. 'hist:' .. jid)
  redis.call('HSET', job, 'st', 'd')
  redis.call('HINCRBY', KEYS[1], 'd', 1)
end
redis.call('UNLINK', base .. 'in:' .. jid)
redis.call('XACK', base .. 'jobs', 'w', ARGV[4])
redis.call('XDEL', base .. 'jobs', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'r', -1)
redis.call('XADD', base .. 'results', '*', 'j', jid)
return 1

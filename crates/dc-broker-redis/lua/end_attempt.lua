-- end_attempt: end a leased attempt without a result (abandon, lease expired, node left):
-- record it in the job's history, then re-queue the job as a new stream entry (which wakes a
-- blocked taker) or, after max attempts failed, fail it for good with a result for the pool.
-- Fenced: nothing happens unless the job is still leased under this attempt, entry and node.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 job id, 3 attempt, 4 entry id, 5 node, 6 attempt record (CBOR),
--       7 "1" when the attempt counts as a failure, "r" when the job is handed back unstarted
--       (no record, no failure, and its next lease reuses this attempt number), else "0"; 8 "lease" to act only when the entry is
--       idle past the session's lease (the reaper) or "any", 9 message if it fails for good,
--       10 failure kind (CBOR) if it fails for good.
-- Returns "stale", "requeued" or "failed". Error DCGONE when the session does not exist.
local broken = session_error(KEYS[1], ARGV[1])
if broken then
  return broken
end
local base = ARGV[1]
local jobs = base .. 'jobs'
local jid = ARGV[2]
local job = base .. 'job:' .. jid
local s = fields_of(job, 'st', 'att', 'e', 'node')
if not (s and s[1] == 'l' and s[2] == ARGV[3] and s[3] == ARGV[4] and s[4] == ARGV[5]) then
  return 'stale'
end
if ARGV[8] == 'lease' then
  local lease = redis.call('HGET', KEYS[1], 'lease')
  local p = redis.pcall('XPENDING', jobs, 'w', 'IDLE', lease, ARGV[4], ARGV[4], 1)
  if type(p) ~= 'table' or p.err or #p == 0 then
    return 'stale'
  end
end
redis.call('XACK', jobs, 'w', ARGV[4])
redis.call('XDEL', jobs, ARGV[4])
bump(KEYS[1], 'r', -1)
if ARGV[7] == 'r' then
  local id = redis.call('XADD', jobs, '*', 'j', jid)
  redis.call('HSET', job, 'st', 'q', 'e', id, 'att', tonumber(s[2]) - 1)
  bump(KEYS[1], 'q', 1)
  return 'requeued'
end
repair(base .. 'hist:' .. jid, 'list')
redis.call('RPUSH', base .. 'hist:' .. jid, ARGV[6])
local fails = count(redis.call('HGET', job, 'fails')) or 0
if ARGV[7] == '1' then
  fails = bump(job, 'fails', 1)
end
if fails >= count(redis.call('HGET', KEYS[1], 'max')) then
  local out = base .. 'out:' .. jid
  redis.call('HSET', job, 'st', 'f')
  redis.call('UNLINK', base .. 'in:' .. jid, out)
  redis.call('HDEL', job, 'c0')
  redis.call('HSET', out, 'k', 'f', 'fk', ARGV[10], 'a', s[2], 'm', ARGV[9], 'n', 0, 'len', 0)
  repair(base .. 'results', 'stream')
  redis.call('XADD', base .. 'results', '*', 'j', jid)
  bump(KEYS[1], 'f', 1)
  return 'failed'
end
local id = redis.call('XADD', jobs, '*', 'j', jid)
redis.call('HSET', job, 'st', 'q', 'e', id)
bump(KEYS[1], 'q', 1)
return 'requeued'

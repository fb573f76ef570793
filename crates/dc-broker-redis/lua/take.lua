-- take: lease up to ARGV[5] queued jobs to node ARGV[2] (the consumer) for worker ARGV[3].
-- A non-blocking XREADGROUP inside the script, so delivery and lease are one atomic step; the
-- client blocks with XREAD on a dedicated connection between tries.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 node, 3 worker, 4 largest payload returned inline, 5 most jobs,
--       6 most inline payload bytes in one reply (the first job's payload is always inline
--       when it is small enough).
-- Returns {1, log length, then per job: job id, attempt, entry id, update seq, chunk count,
-- length, the hash holding its chunks, payload or false when it must be fetched by chunks}, or {0, last generated id of the
-- job stream, log length} when nothing is queued. Error DCGONE when the session does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('DCGONE session is gone')
end
local base = ARGV[1]
local jobs = base .. 'jobs'
local inline_max = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local budget = tonumber(ARGV[6])
local loglen = redis.call('XLEN', base .. 'upd')
local out = { 1, loglen }
local taken = 0
local bytes = 0
local drops = 0
while taken < want and drops < 100 do
  local got = redis.call('XREADGROUP', 'GROUP', 'w', ARGV[2], 'COUNT', want - taken, 'STREAMS',
    jobs, '>')
  if not got then
    break
  end
  for _, entry in ipairs(got[1][2]) do
    local id = entry[1]
    local jid = field(entry[2], 'j')
    local job = jid and (base .. 'job:' .. jid)
    local s = job and redis.call('HMGET', job, 'st', 'e', 'upd', 'n', 'len', 'att', 'm', 'c0')
    if s and s[1] == 'q' and s[2] == id then
      local att = tonumber(s[6]) + 1
      redis.call('HSET', job, 'st', 'l', 'att', att, 'node', ARGV[2], 'worker', ARGV[3])
      -- Where the payload's chunks are: the job's own hash (small) or in:<id>.
      local holder = job
      if s[7] ~= 'i' then
        holder = base .. 'in:' .. jid
      end
      local data = false
      local len = tonumber(s[5])
      if tonumber(s[4]) == 1 and len <= inline_max and (taken == 0 or bytes + len <= budget) then
        data = s[8]
        if holder ~= job then
          data = redis.call('HGET', holder, 'c0')
        end
        bytes = bytes + len
      end
      taken = taken + 1
      local n = #out
      out[n + 1], out[n + 2], out[n + 3], out[n + 4] = jid, att, id, s[3]
      out[n + 5], out[n + 6], out[n + 7], out[n + 8] = s[4], s[5], holder, data
    else
      -- Stale (the job finished or was re-queued as another entry) or malformed: drop it.
      if not (s and s[1]) then
        redis.log(redis.LOG_WARNING, 'distributed-computing: dropped job stream entry ' .. id ..
          ' of ' .. jobs .. ': it names no job of this session (malformed or foreign)')
      end
      redis.call('XACK', jobs, 'w', id)
      redis.call('XDEL', jobs, id)
      drops = drops + 1
    end
  end
end
if taken > 0 then
  redis.call('HINCRBY', KEYS[1], 'q', -taken)
  redis.call('HINCRBY', KEYS[1], 'r', taken)
  return out
end
return { 0, last_id(jobs), loglen }

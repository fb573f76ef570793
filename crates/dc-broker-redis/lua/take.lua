-- take: lease up to ARGV[5] queued jobs to node ARGV[2] (the consumer) for worker ARGV[3].
-- A non-blocking XREADGROUP inside the script, so delivery and lease are one atomic step; the
-- client blocks with XREAD on a dedicated connection between tries.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 node, 3 worker, 4 largest payload returned inline, 5 most jobs,
--       6 most inline payload bytes in one reply (the first job's payload is always inline
--       when it is small enough), 7 the failure kind (CBOR) of a job whose record is damaged.
-- Returns {1, log length, then per job: job id, attempt, entry id, update seq, chunk count,
-- length, the hash holding its chunks, payload or false when it must be fetched by chunks}, or {0, last generated id of the
-- job stream, log length} when nothing is queued. Error DCGONE when the session does not exist.
local broken = session_error(KEYS[1], ARGV[1])
if broken then
  return broken
end
local base = ARGV[1]
local jobs = base .. 'jobs'
local inline_max = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local budget = tonumber(ARGV[6])
local loglen = redis.pcall('XLEN', base .. 'upd')
if type(loglen) == 'table' then
  damaged(base .. 'upd cannot be read (' .. tostring(loglen.err) .. '): the session is treated as gone')
  return redis.error_reply('DCGONE session is damaged')
end
local out = { 1, loglen }
local taken = 0
local bytes = 0
local drops = 0
while taken < want and drops < 100 do
  local got = redis.pcall('XREADGROUP', 'GROUP', 'w', ARGV[2], 'COUNT', want - taken, 'STREAMS',
    jobs, '>')
  if type(got) == 'table' and got.err then
    -- The job stream or its consumer group is damaged: nothing in it can be trusted.
    damaged(jobs .. ' cannot be read (' .. got.err .. '): the session is treated as gone')
    return redis.error_reply('DCGONE session is damaged')
  end
  if not got then
    break
  end
  for _, entry in ipairs(got[1][2]) do
    local id = entry[1]
    local jid = field(entry[2], 'j')
    local job = count(jid) and (base .. 'job:' .. jid)
    local s = job and fields_of(job, 'st', 'e', 'upd', 'n', 'len', 'att', 'm', 'c0')
    if s and s[1] == 'q' and s[2] == id then
      -- A damaged attempt number is repaired (the lease fences by entry id too); damaged
      -- lengths are handed out as they are, and the node fails that job with their record.
      local att = count(s[6])
      if not att or att >= 4294967295 then
        damaged('job ' .. job .. ' had a damaged attempt number; counted from 0')
        att = 0
      end
      att = att + 1
      redis.call('HSET', job, 'st', 'l', 'att', att, 'node', ARGV[2], 'worker', ARGV[3])
      -- Where the payload's chunks are: the job's own hash (small) or in:<id>.
      local holder = job
      if s[7] ~= 'i' then
        holder = base .. 'in:' .. jid
      end
      local data = false
      local len = count(s[5])
      if count(s[4]) == 1 and len and len <= inline_max and (taken == 0 or bytes + len <= budget) then
        data = s[8]
        if holder ~= job then
          data = redis.pcall('HGET', holder, 'c0')
          if type(data) ~= 'string' then
            data = false
          end
        end
        bytes = bytes + len
      end
      taken = taken + 1
      local n = #out
      out[n + 1], out[n + 2], out[n + 3], out[n + 4] = jid, att, id, s[3]
      out[n + 5], out[n + 6], out[n + 7], out[n + 8] = s[4], s[5], holder, data
    elseif job and not s then
      -- The job's record is not a hash: nothing of it can be trusted. The job fails for good,
      -- with a word for its owner, instead of vanishing.
      damaged(job .. ' was not a hash; job ' .. jid .. ' fails')
      redis.call('UNLINK', job, base .. 'in:' .. jid)
      redis.call('HSET', job, 'st', 'f')
      local result = base .. 'out:' .. jid
      redis.call('UNLINK', result)
      redis.call('HSET', result, 'k', 'f', 'fk', ARGV[7], 'a', 0, 'm',
        'its record in the broker was damaged (not a hash)', 'n', 0, 'len', 0)
      repair(base .. 'results', 'stream')
      redis.call('XADD', base .. 'results', '*', 'j', jid)
      bump(KEYS[1], 'q', -1)
      bump(KEYS[1], 'f', 1)
      redis.call('XACK', jobs, 'w', id)
      redis.call('XDEL', jobs, id)
      drops = drops + 1
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
  bump(KEYS[1], 'q', -taken)
  bump(KEYS[1], 'r', taken)
  return out
end
return { 0, last_id(jobs), loglen }

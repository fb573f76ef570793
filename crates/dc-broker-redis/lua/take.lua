-- take: lease the next queued job to node ARGV[2] (the consumer) for worker ARGV[3].
-- A non-blocking XREADGROUP inside the script, so delivery and lease are one atomic step; the
-- client blocks with XREAD on a dedicated connection between tries.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 node, 3 worker, 4 largest payload returned inline.
-- Returns {1, job id, attempt, entry id, update seq, log length, chunk count, length, payload
-- or nil when it must be fetched by chunks}, or {0, last generated id of the job stream, log
-- length} when nothing is queued. Error DCGONE when the session does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('DCGONE session is gone')
end
local base = ARGV[1]
local jobs = base .. 'jobs'
local loglen = redis.call('XLEN', base .. 'upd')
for _ = 1, 100 do
  local got = redis.call('XREADGROUP', 'GROUP', 'w', ARGV[2], 'COUNT', 1, 'STREAMS', jobs, '>')
  if not got then
    break
  end
  local entry = got[1][2][1]
  local id, fields = entry[1], entry[2]
  local jid = false
  if type(fields) == 'table' then
    for i = 1, #fields, 2 do
      if fields[i] == 'j' then
        jid = fields[i + 1]
      end
    end
  end
  local job = jid and (base .. 'job:' .. jid)
  local s = job and redis.call('HMGET', job, 'st', 'e', 'upd', 'n', 'len')
  if s and s[1] == 'q' and s[2] == id then
    local att = redis.call('HINCRBY', job, 'att', 1)
    redis.call('HSET', job, 'st', 'l', 'node', ARGV[2], 'worker', ARGV[3])
    redis.call('HINCRBY', KEYS[1], 'q', -1)
    redis.call('HINCRBY', KEYS[1], 'r', 1)
    local data = false
    if tonumber(s[4]) == 1 and tonumber(s[5]) <= tonumber(ARGV[4]) then
      data = redis.call('HGET', base .. 'in:' .. jid, 'c0')
    end
    return { 1, jid, att, id, s[3], loglen, s[4], s[5], data }
  end
  -- Stale (the job finished or was re-queued as another entry) or malformed: drop it.
  if not (s and s[1]) then
    redis.log(redis.LOG_WARNING, 'distributed-computing: dropped job stream entry ' .. id ..
      ' of ' .. jobs .. ': it names no job of this session (malformed or foreign)')
  end
  redis.call('XACK', jobs, 'w', id)
  redis.call('XDEL', jobs, id)
end
local last = '0-0'
if redis.call('EXISTS', jobs) == 1 then
  local info = redis.call('XINFO', 'STREAM', jobs)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
end
return { 0, last, loglen }

-- submit: queue jobs in order; a job id the session already knows is ignored (idempotent).
-- KEYS[1] session meta.
-- ARGV: 1 session key base, then per job 6 values: id, update seq, chunk count, length,
--       mode ("i": payload inline in the next value, kept as field c0 of job:<id>; "s": the
--       next value names a staged chunk hash, renamed to in:<id>), payload or staged key.
-- Returns the number of jobs queued. Error DCGONE when the session does not exist.
local broken = session_error(KEYS[1], ARGV[1])
if broken then
  for i = 2, #ARGV, 6 do
    if ARGV[i + 4] == 's' then
      redis.call('UNLINK', ARGV[i + 5])
    end
  end
  return broken
end
local base = ARGV[1]
local added = 0
for i = 2, #ARGV, 6 do
  local jid, upd, n, len, mode, data = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local job = base .. 'job:' .. jid
  local input = base .. 'in:' .. jid
  if redis.call('EXISTS', job) == 1 and type_of(job) ~= 'hash' then
    -- A damaged job of this id: the new one replaces it.
    damaged(job .. ' was not a hash; replaced by the job submitted again')
    redis.call('UNLINK', job, input)
  end
  if redis.call('EXISTS', job) == 1 then
    if mode == 's' then
      redis.call('UNLINK', data)
    end
  else
    local id = redis.call('XADD', base .. 'jobs', '*', 'j', jid)
    if mode == 's' then
      redis.call('RENAME', data, input)
      redis.call('PERSIST', input)
      redis.call('HSET', job, 'st', 'q', 'att', 0, 'fails', 0, 'upd', upd, 'n', n, 'len', len,
        'e', id, 'm', 's')
    else
      -- A small payload lives in the job's own hash, as its chunk c0.
      redis.call('HSET', job, 'st', 'q', 'att', 0, 'fails', 0, 'upd', upd, 'n', n, 'len', len,
        'e', id, 'm', 'i', 'c0', data)
    end
    added = added + 1
  end
end
bump(KEYS[1], 'q', added)
return added

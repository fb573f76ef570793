-- complete: commit attempts' outcomes, first writer wins: each only while its job is still
-- leased under that attempt, entry and node; then ack and delete the entry, free the payload
-- and tell the pool through the results stream.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, then 12 per outcome: job id, attempt, entry id, node, attempt
--       record (CBOR), "d" (done) or "f" (failed), failure kind (CBOR) or "", message, chunk
--       count, length, mode ("i" inline in the next argument, "s" the next names a staged
--       chunk hash, "n" no output), output or staged key.
-- A result with its output inline goes to the pool inside its results stream notice
-- (j, a attempts, len, o output); any other outcome is kept in out:<id> and its notice names
-- only the job.
-- Returns one 1 (accepted) or 0 (discarded) per outcome. Error DCGONE when the session does not
-- exist.
local base = ARGV[1]
local outcomes = (#ARGV - 1) / 12
local broken = session_error(KEYS[1], base)
if broken then
  for k = 0, outcomes - 1 do
    local a = 1 + 12 * k
    if ARGV[a + 11] == 's' then
      redis.call('UNLINK', ARGV[a + 12])
    end
  end
  return broken
end
local answers = {}
local entries = {}
local done, failed = 0, 0
for k = 0, outcomes - 1 do
  local a = 1 + 12 * k
  local jid, attempt, entry, node = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local record, kind, fkind, message = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]
  local n, len, mode, output = ARGV[a + 9], ARGV[a + 10], ARGV[a + 11], ARGV[a + 12]
  local job = base .. 'job:' .. jid
  local s = fields_of(job, 'st', 'att', 'e', 'node', 'm')
  if not (s and s[1] == 'l' and s[2] == attempt and s[3] == entry and s[4] == node) then
    if mode == 's' then
      redis.call('UNLINK', output)
    end
    answers[k + 1] = 0
  else
    repair(base .. 'results', 'stream')
    if kind == 'd' and mode == 'i' then
      -- A small result travels in its notice: nothing else to write, read or delete.
      redis.call('XADD', base .. 'results', '*', 'j', jid, 'a', s[2], 'len', len, 'o', output)
    else
      local out = base .. 'out:' .. jid
      redis.call('UNLINK', out)
      if mode == 's' then
        redis.call('RENAME', output, out)
        redis.call('PERSIST', out)
      end
      redis.call('HSET', out, 'k', kind, 'fk', fkind, 'a', s[2], 'm', message, 'n', n, 'len', len)
      redis.call('XADD', base .. 'results', '*', 'j', jid)
    end
    local st = 'd'
    if kind == 'f' then
      repair(base .. 'hist:' .. jid, 'list')
      redis.call('RPUSH', base .. 'hist:' .. jid, record)
      st = 'f'
      failed = failed + 1
    else
      if s[2] ~= '1' then
        -- Earlier attempts ended without a result and left their records.
        redis.call('UNLINK', base .. 'hist:' .. jid)
      end
      done = done + 1
    end
    -- The job is over: its payload goes (emptied in place when it lived in the job's hash).
    if s[5] == 'i' then
      redis.call('HSET', job, 'st', st, 'c0', '')
    else
      redis.call('HSET', job, 'st', st)
      redis.call('UNLINK', base .. 'in:' .. jid)
    end
    entries[#entries + 1] = entry
    answers[k + 1] = 1
  end
end
-- Ack and delete the finished entries together.
for i = 1, #entries, 1000 do
  local last = math.min(i + 999, #entries)
  redis.call('XACK', base .. 'jobs', 'w', unpack(entries, i, last))
  redis.call('XDEL', base .. 'jobs', unpack(entries, i, last))
end
if done > 0 then
  bump(KEYS[1], 'd', done)
end
if failed > 0 then
  bump(KEYS[1], 'f', failed)
end
if done + failed > 0 then
  bump(KEYS[1], 'r', -(done + failed))
end
return answers

-- pending: list the leases held in a session, optionally only those idle past the session's
-- lease (the reaper) or only those of one node (a node leaving). Pending entries that match no
-- leased job are acked and deleted on the way.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 "lease" (idle past the lease) or "any", 3 node or "", 4 count.
-- Returns a flat list of 5-tuples: job id, attempt, entry id, node, worker.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
local base = ARGV[1]
local jobs = base .. 'jobs'
local args = { 'XPENDING', jobs, 'w' }
if ARGV[2] == 'lease' then
  local m = fields_of(KEYS[1], 'lease')
  local lease = m and count(m[1])
  if not lease then
    damaged(KEYS[1] .. ' has no sound lease: its pending jobs are left alone')
    return {}
  end
  table.insert(args, 'IDLE')
  table.insert(args, lease)
end
table.insert(args, '-')
table.insert(args, '+')
table.insert(args, ARGV[4])
if ARGV[3] ~= '' then
  table.insert(args, ARGV[3])
end
local out = {}
local pending = redis.pcall(unpack(args))
if pending.err then
  damaged(jobs .. ' cannot be read (' .. pending.err .. ')')
  return {}
end
for _, p in ipairs(pending) do
  local id = p[1]
  local r = redis.call('XRANGE', jobs, id, id)
  local jid = r[1] and field(r[1][2], 'j')
  local job = count(jid) and base .. 'job:' .. jid
  local s = job and fields_of(job, 'st', 'att', 'e', 'node', 'worker')
  if s and s[1] == 'l' and s[3] == id then
    local att = count(s[2])
    if not att or att >= 4294967295 then
      -- Damaged: no client can name this attempt. Set to 0, its lease can still end.
      damaged(job .. ' had a damaged attempt number; set to 0')
      redis.call('HSET', job, 'att', 0)
      s[2] = '0'
    end
    for _, v in ipairs({ jid, s[2], id, s[4] or '', s[5] or '' }) do
      table.insert(out, v)
    end
  else
    redis.call('XACK', jobs, 'w', id)
    redis.call('XDEL', jobs, id)
  end
end
return out

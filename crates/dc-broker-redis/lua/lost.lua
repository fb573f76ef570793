-- lost: of the jobs a pool still waits for (ARGV[2..]), those the broker no longer holds, after
-- repairing what can be repaired: a queued or leased job whose stream entry is gone is queued
-- again (a lease without its entry would never end), and a finished job whose result is kept
-- but whose notice is gone is announced again (the pool drops a second notice). A job with no
-- sound record, or whose result travelled in a notice that is gone, is lost: its record is
-- removed so that the pool can submit it again under the same id. A finished job is repaired
-- or counted lost only while no notice waits to be read, and when the pool asks for it a
-- second time (its notice may have been read a moment before, its result still on its way);
-- the client leaves out the jobs whose results it is reading now.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, then job ids.
-- Returns the ids of the lost jobs. Error DCGONE when the session does not exist.
local base = ARGV[1]
local broken = session_error(KEYS[1], base)
if broken then
  return broken
end
local jobs = base .. 'jobs'
local lost = {}
-- While notices wait to be read, a finished job's result may be among them.
local notices = redis.pcall('XLEN', base .. 'results')
local unread = type(notices) == 'number' and notices > 0
for i = 2, #ARGV do
  local jid = ARGV[i]
  local job = base .. 'job:' .. jid
  local out = base .. 'out:' .. jid
  local s = fields_of(job, 'st', 'e')
  local st = s and s[1]
  if st == 'q' or st == 'l' then
    local entry = s[2] and redis.pcall('XRANGE', jobs, s[2], s[2])
    if not (type(entry) == 'table' and not entry.err and #entry == 1) then
      damaged(job .. ' had lost its queue entry; queued again')
      local id = redis.call('XADD', jobs, '*', 'j', jid)
      redis.call('HSET', job, 'st', 'q', 'e', id)
      if st == 'l' then
        bump(KEYS[1], 'r', -1)
        bump(KEYS[1], 'q', 1)
      end
    end
  elseif (st == 'd' or st == 'f') and unread then
    -- Maybe in a notice not read yet: asked again later if it never comes.
  elseif (st == 'd' or st == 'f') and redis.call('HGET', job, 'lost') ~= '1' then
    -- Its notice may have been read a moment ago, the result still on its way to the pool's
    -- caller: marked now, and repaired only if the pool still asks for it next time.
    redis.call('HSET', job, 'lost', '1')
  elseif (st == 'd' or st == 'f') and redis.call('EXISTS', out) == 1 then
    damaged('the result notice of ' .. job .. ' was lost; announced again')
    repair(base .. 'results', 'stream')
    redis.call('XADD', base .. 'results', '*', 'j', jid)
  else
    redis.call('UNLINK', job, base .. 'in:' .. jid, out, base .. 'hist:' .. jid)
    lost[#lost + 1] = jid
  end
end
return lost

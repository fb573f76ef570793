-- publish_update: append an update to the session's log; entry id <seq>-0 makes the sequence
-- number the stream id, so readers range over it directly. Never trimmed while the session lives.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 mode ("i" inline in ARGV[3], "s" ARGV[3] names a staged chunk
--       hash, renamed to updb:<seq>), 3 payload or staged key, 4 chunk count, 5 length,
--       6 key TTL ms, 7 (optional) the sequence number it must get: when the log already
--       holds it (a retry after a lost answer) nothing is added; when the log holds fewer than
--       one less, updates were lost and the session is treated as gone.
-- Returns the update's sequence number (1, 2, 3...). Error DCGONE when the session does not exist.
local upd = ARGV[1] .. 'upd'
local broken = session_error(KEYS[1], ARGV[1])
local len = not broken and redis.pcall('XLEN', upd)
if not broken and type(len) ~= 'number' then
  damaged(upd .. ' cannot be read: the session is treated as gone')
  broken = redis.error_reply('DCGONE session is damaged')
end
if broken then
  if ARGV[2] == 's' then
    redis.call('UNLINK', ARGV[3])
  end
  return broken
end
local seq = len + 1
local want = ARGV[7] and count(ARGV[7])
if want and want ~= seq then
  if ARGV[2] == 's' then
    redis.call('UNLINK', ARGV[3])
  end
  if want < seq then
    return want
  end
  damaged(upd .. ' holds ' .. len .. ' updates where its pool published ' .. (want - 1) ..
    ': the session is treated as gone')
  return redis.error_reply('DCGONE session is damaged')
end
if ARGV[2] == 's' then
  local body = ARGV[1] .. 'updb:' .. seq
  redis.call('RENAME', ARGV[3], body)
  redis.call('PERSIST', body)
  redis.call('XADD', upd, seq .. '-0', 'n', ARGV[4], 'len', ARGV[5])
else
  redis.call('XADD', upd, seq .. '-0', 'd', ARGV[3])
end
redis.call('PEXPIRE', upd, ARGV[6])
return seq

-- read_updates: updates after sequence ARGV[2], at most ARGV[3], and no more inline bytes than
-- ARGV[4] (at least one update is always returned when there is one).
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 after, 3 max, 4 byte budget.
-- Returns a flat list of 4-tuples: seq, payload (nil when chunked), chunk count, length.
-- Error DCGONE when the session does not exist.
local broken = session_error(KEYS[1], ARGV[1])
if broken then
  return broken
end
local got = redis.pcall('XRANGE', ARGV[1] .. 'upd', (tonumber(ARGV[2]) + 1) .. '-0', '+', 'COUNT', ARGV[3])
if got.err then
  -- The update log is lost: the pool opens a new session and publishes it again.
  damaged(ARGV[1] .. 'upd cannot be read (' .. got.err .. '): the session is treated as gone')
  return redis.error_reply('DCGONE session is damaged')
end
local out = {}
local bytes = 0
for _, entry in ipairs(got) do
  if bytes >= tonumber(ARGV[4]) then
    break
  end
  local seq = string.match(entry[1], '^(%d+)-')
  local data, n, len = false, false, false
  if type(entry[2]) == 'table' then
    for i = 1, #entry[2], 2 do
      local f, v = entry[2][i], entry[2][i + 1]
      if f == 'd' then
        data = v
        bytes = bytes + #v
      elseif f == 'n' then
        n = v
      elseif f == 'len' then
        len = v
      end
    end
  end
  for _, v in ipairs({ seq or false, data, n, len }) do
    table.insert(out, v)
  end
end
return out

-- active: the active session and its spec.
-- KEYS[1] active pointer, KEYS[2] "opened" stream.
-- ARGV: 1 key prefix, 2 largest spec returned inline.
-- Returns {1, session id, spec chunk count, spec length, spec CBOR or nil when it must be
-- fetched by chunks}, or {0, last generated id of the "opened" stream} when none is active.
local sid = redis.pcall('GET', KEYS[1])
if type(sid) == 'string' then
  local base = ARGV[1] .. ':{' .. sid .. '}:'
  local m = fields_of(base .. 'meta', 'sn', 'slen') or {}
  if count(m[1]) and count(m[2]) then
    local data = false
    if count(m[1]) == 1 and count(m[2]) <= tonumber(ARGV[2]) then
      data = redis.call('HGET', base .. 'spec', 'c0')
    end
    return { 1, sid, m[1], m[2], data }
  end
end
return { 0, last_id(KEYS[2]) }

-- sessions: the active session and every session still registered, read together so a session
-- opened meanwhile is never taken for a dead one.
-- KEYS[1] active pointer, KEYS[2] sessions ZSET.
-- Returns {active session id or nil, {session id...}}.
local active = redis.pcall('GET', KEYS[1])
if type(active) ~= 'string' then
  active = false
end
local all = redis.pcall('ZRANGE', KEYS[2], 0, -1)
if all.err then
  all = {}
end
return { active, all }

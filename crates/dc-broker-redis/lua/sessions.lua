-- sessions: the active session and every session still registered, read together so a session
-- opened meanwhile is never taken for a dead one.
-- KEYS[1] active pointer, KEYS[2] sessions ZSET.
-- Returns {active session id or nil, {session id...}}.
return { redis.call('GET', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1) }

-- lib: helpers prepended to the scripts that use them (see `Scripts` in broker.rs).

-- The last id `stream` generated ('0-0' when it does not exist): entries after it are new.
local function last_id(stream)
  if redis.call('EXISTS', stream) == 0 then
    return '0-0'
  end
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      return info[i + 1]
    end
  end
  return '0-0'
end

-- The value of `name` in a stream entry's flat field list, or false.
local function field(fields, name)
  if type(fields) ~= 'table' then
    return false
  end
  for i = 1, #fields, 2 do
    if fields[i] == name then
      return fields[i + 1]
    end
  end
  return false
end


-- Everything read back from Redis may have been damaged (by a bug, a crash in another version,
-- or anyone holding the password): a script checks a value before it computes with it, and
-- never stops half-way on a bad one. A key of the wrong type makes its command fail, so
-- commands on keys that may be damaged go through `redis.pcall`.

-- Log a damaged value (found and worked around) in the server's log.
local function damaged(what)
  redis.log(redis.LOG_WARNING, 'distributed-computing: ' .. what)
end

-- A whole number >= 0 stored as plain decimal digits (at most 15, so it is exact), or nil when
-- the value is missing or damaged.
local function count(v)
  if type(v) == 'string' and #v >= 1 and #v <= 15 and string.match(v, '^%d+$') then
    return tonumber(v)
  end
  return nil
end

-- HMGET of a hash that may be damaged: the fields, or nil when the key is not a hash.
local function fields_of(key, ...)
  local r = redis.pcall('HMGET', key, ...)
  if type(r) == 'table' and r.err then
    damaged(key .. ' is not a hash (' .. r.err .. ')')
    return nil
  end
  return r
end

-- HINCRBY on a counter that may be damaged: a value that is not an integer is reset to 0 first
-- (and logged), so the script goes on.
local function bump(key, name, by)
  local n = redis.pcall('HINCRBY', key, name, by)
  if type(n) == 'number' then
    return n
  end
  damaged('counter ' .. name .. ' of ' .. key .. ' was not a number; reset to 0')
  redis.call('HSET', key, name, 0)
  return redis.call('HINCRBY', key, name, by)
end

-- Whether the session meta `meta` is sound enough to work on: it exists and is a hash whose
-- lease and attempt limit are numbers (and, given the session's key base, its job stream is a
-- stream and its update log a stream or not yet there). Every script that works on a session
-- asks the same, so a pool and its nodes agree on a damaged session. A damaged one is reported as a session that is gone: the pool then opens a new
-- session and submits again what it has not received. Returns the error reply, or nil.
local function session_error(meta, base)
  local m = redis.pcall('HMGET', meta, 'lease', 'max')
  if m.err then
    damaged(meta .. ' is not a hash: the session is treated as gone')
    return redis.error_reply('DCGONE session is damaged')
  end
  if not m[1] and not m[2] and redis.call('EXISTS', meta) == 0 then
    return redis.error_reply('DCGONE session is gone')
  end
  if not (count(m[1]) and count(m[2])) then
    damaged(meta .. ' has a damaged lease or attempt limit: the session is treated as gone')
    return redis.error_reply('DCGONE session is damaged')
  end
  if base then
    if redis.call('TYPE', base .. 'jobs')['ok'] ~= 'stream' then
      damaged(base .. 'jobs is not a stream: the session is treated as gone')
      return redis.error_reply('DCGONE session is damaged')
    end
    local upd = redis.call('TYPE', base .. 'upd')['ok']
    if upd ~= 'stream' and upd ~= 'none' then
      damaged(base .. 'upd is a ' .. upd .. ', not a stream: the session is treated as gone')
      return redis.error_reply('DCGONE session is damaged')
    end
  end
  return nil
end

-- The type of `key` ('none' when it does not exist).
local function type_of(key)
  return redis.call('TYPE', key)['ok']
end

-- Delete `key` when it exists with another type than `want` (damaged), so that the command
-- that follows can recreate it.
local function repair(key, want)
  local t = type_of(key)
  if t ~= 'none' and t ~= want then
    damaged(key .. ' was a ' .. t .. ', not a ' .. want .. '; deleted')
    redis.call('UNLINK', key)
  end
end

-- take_results: hand out up to ARGV[2] results, each once (its notice is deleted as it is read).
-- A small output comes in its notice (complete put it there) or from out:<id>, whose keys are
-- deleted here; a large output stays in out:<id> for the client to fetch by chunks and delete.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 max results, 3 largest output returned inline.
-- Returns {1, id of the last notice read, {job id, kind, failure kind, attempts, message, chunk
-- count, length, output or nil, history list}...}, or {0, last generated id of the results
-- stream} when there is none.
-- Error DCGONE when the session does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('DCGONE session is gone')
end
local base = ARGV[1]
local results = base .. 'results'
local got = redis.call('XRANGE', results, '-', '+', 'COUNT', ARGV[2])
if #got == 0 then
  return { 0, last_id(results) }
end
local out = { 1, got[#got][1] }
local ids = {}
for _, entry in ipairs(got) do
  ids[#ids + 1] = entry[1]
  local jid = field(entry[2], 'j')
  local output = field(entry[2], 'o')
  if jid and output then
    -- The output came inline in the notice.
    local attempts, len = field(entry[2], 'a'), field(entry[2], 'len')
    table.insert(out, { jid, 'd', '', attempts, '', 1, len, output, {} })
  elseif jid then
    local key = base .. 'out:' .. jid
    local hist = base .. 'hist:' .. jid
    local h = redis.call('HMGET', key, 'k', 'fk', 'a', 'm', 'n', 'len')
    local data = false
    local history = {}
    if h[1] == 'd' then
      if tonumber(h[5]) == 1 and tonumber(h[6]) <= tonumber(ARGV[3]) then
        data = redis.call('HGET', key, 'c0')
        redis.call('UNLINK', key)
      end
    else
      history = redis.call('LRANGE', hist, 0, -1)
      redis.call('UNLINK', key)
    end
    redis.call('UNLINK', hist)
    table.insert(out, { jid, h[1], h[2], h[3], h[4], h[5], h[6], data, history })
  else
    table.insert(out, { false })
  end
end
for i = 1, #ids, 1000 do
  redis.call('XDEL', results, unpack(ids, i, math.min(i + 999, #ids)))
end
return out

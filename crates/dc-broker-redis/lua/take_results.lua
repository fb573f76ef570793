-- take_results: hand out up to ARGV[2] results, each once (its notice is deleted as it is read).
-- A small output comes in its notice (complete put it there) or from out:<id>, whose keys are
-- deleted here; a large output stays in out:<id> for the client to fetch by chunks and delete.
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 max results, 3 largest output returned inline.
-- Returns {1, id of the last notice read, {job id, kind, failure kind, attempts, message, chunk
-- count, length, output or nil, history list}...}, or {0, last generated id of the results
-- stream} when there is none.
-- Error DCGONE when the session does not exist.
local broken = session_error(KEYS[1], ARGV[1])
if broken then
  return broken
end
local base = ARGV[1]
local results = base .. 'results'
local got = redis.pcall('XRANGE', results, '-', '+', 'COUNT', ARGV[2])
if type(got) == 'table' and got.err then
  -- Not a stream: its notices are lost; the pool submits again what it never hears of.
  repair(results, 'stream')
  got = {}
end
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
    local h = fields_of(key, 'k', 'fk', 'a', 'm', 'n', 'len') or {}
    local data = false
    local history = {}
    if h[1] == 'd' then
      local len = count(h[6])
      if count(h[5]) == 1 and len and len <= tonumber(ARGV[3]) then
        data = redis.call('HGET', key, 'c0')
        redis.call('UNLINK', key)
      end
    else
      history = redis.pcall('LRANGE', hist, 0, -1)
      if history.err then
        damaged(hist .. ' is not a list')
        history = {}
      end
      redis.call('UNLINK', key)
    end
    redis.call('UNLINK', hist)
    table.insert(out, { jid, h[1] or false, h[2] or false, h[3] or false, h[4] or false,
      h[5] or false, h[6] or false, data, history })
  else
    table.insert(out, { false })
  end
end
for i = 1, #ids, 1000 do
  redis.call('XDEL', results, unpack(ids, i, math.min(i + 999, #ids)))
end
return out

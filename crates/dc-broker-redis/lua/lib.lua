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


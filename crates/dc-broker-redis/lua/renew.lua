-- renew: node ARGV[2] renews the leases it lists. Owner-checked: a lease is renewed only when
-- the job is still leased to this node under this attempt and entry, and the entry is pending
-- for this node; then XCLAIM ... 0 JUSTID resets the entry's idle time (the lease clock).
-- KEYS[1] session meta.
-- ARGV: 1 session key base, 2 node, then per lease 3 values: job id, attempt, entry id.
-- Returns how many leases were renewed (0 for a session that no longer exists).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local base = ARGV[1]
local jobs = base .. 'jobs'
local renewed = 0
for i = 3, #ARGV, 3 do
  local s = fields_of(base .. 'job:' .. ARGV[i], 'st', 'att', 'e', 'node')
  if s and s[1] == 'l' and s[2] == ARGV[i + 1] and s[3] == ARGV[i + 2] and s[4] == ARGV[2] then
    local p = redis.pcall('XPENDING', jobs, 'w', ARGV[i + 2], ARGV[i + 2], 1)
    if not p.err and p[1] and p[1][2] == ARGV[2] then
      redis.call('XCLAIM', jobs, 'w', ARGV[2], 0, ARGV[i + 2], 'JUSTID')
      renewed = renewed + 1
    end
  end
end
return renewed

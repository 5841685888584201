-- Settle one admitted request: move token buckets and budgets by (actual - estimated) and
-- release the concurrency lease. One atomic step, one cluster slot (keys share the team tag).
--
-- KEYS: token buckets, then budget counters, then the concurrency zset (if any).
-- ARGV: n_buckets, n_budgets, has_concurrency, lease_id, delta, now_ms (empty: the server's
--       clock), then per bucket: limit_per_minute; then per budget: ttl_ms.

local nb = tonumber(ARGV[1])
local nbud = tonumber(ARGV[2])
local has_conc = tonumber(ARGV[3])
local lease_id = ARGV[4]
local delta = tonumber(ARGV[5])
local now = tonumber(ARGV[6])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local period = 60000

if delta ~= 0 then
  for i = 1, nb do
    local T = period / tonumber(ARGV[6 + i])
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    local new_tat = tat + delta * T
    if new_tat > now then
      redis.call('SET', KEYS[i], string.format('%.17g', new_tat), 'PX',
                 math.ceil(new_tat - now) + 1000)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  for j = 1, nbud do
    local ttl = tonumber(ARGV[6 + nb + j])
    local used = redis.call('INCRBY', KEYS[nb + j], delta)
    if used < 0 then redis.call('SET', KEYS[nb + j], 0, 'KEEPTTL') end
    if redis.call('PTTL', KEYS[nb + j]) < 0 then
      redis.call('PEXPIRE', KEYS[nb + j], ttl + 60000)
    end
  end
end

if has_conc == 1 then
  redis.call('ZREM', KEYS[nb + nbud + 1], lease_id)
end
return 1

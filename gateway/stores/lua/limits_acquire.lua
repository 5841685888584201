-- Check and reserve every limit of one request in one atomic step (all or nothing).
--
-- KEYS: one per GCRA bucket, then one per budget counter, then the concurrency zset (if any);
--       all share one hash tag (the team), so the script touches one cluster slot.
-- ARGV: n_buckets, n_budgets, has_concurrency, lease_id, lease_ms, concurrency_limit, now_ms
--       (empty: the server's clock), then per bucket: limit_per_minute, cost; then per
--       budget: limit, cost, ttl_ms.
-- Returns: {admitted, denied_index (1-based over buckets, budgets, concurrency; 0 = none),
--           retry_after_ms, then per bucket: remaining, reset_ms; per budget: remaining,
--           reset_ms}.
-- Time is the server's (TIME), so every replica measures against one clock; only tests pass
-- now_ms, to move time without sleeping.

local nb = tonumber(ARGV[1])
local nbud = tonumber(ARGV[2])
local has_conc = tonumber(ARGV[3])
local lease_id = ARGV[4]
local lease_ms = tonumber(ARGV[5])
local conc_limit = tonumber(ARGV[6])
local now = tonumber(ARGV[7])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local period = 60000
-- the checks and remaining figures compare against the period plus slack for floating point:
-- a TAT is a double near 1.7e12 ms whose last bit is worth 0.24 us, so each interval added
-- to it can round that much over, and a full burst at one instant summed to more than the
-- period. Requests of `cost` fill a bucket in limit / cost additions, so the slack is that
-- many last bits (and at least 10 us). gateway/stores/limits.py has the same slack.
local slack_per_addition = 0.00025
local min_slack = 0.01

local denied = 0
local retry = 0
local out = {}
local new_tats = {}

-- GCRA: a bucket holds its theoretical arrival time (TAT); a request of `cost` units fits
-- when tat + cost * T - period <= now, with T = period / limit.
for i = 1, nb do
  local limit = tonumber(ARGV[7 + (i - 1) * 2 + 1])
  local cost = tonumber(ARGV[7 + (i - 1) * 2 + 2])
  local T = period / limit
  local window = period + math.max(min_slack, limit / math.max(cost, 1) * slack_per_addition)
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local check = math.min(cost, limit) * T
  local allow_at = tat + check - window
  if allow_at > now then
    if denied == 0 then
      denied = i
      retry = allow_at - now
    end
    new_tats[i] = false
    local remaining = math.floor((window - (tat - now)) / T)
    if remaining < 0 then remaining = 0 end
    out[#out + 1] = remaining
    out[#out + 1] = math.ceil(tat - now)
  else
    local new_tat = tat + cost * T
    new_tats[i] = new_tat
    local remaining = math.floor((window - (new_tat - now)) / T)
    if remaining < 0 then remaining = 0 end
    out[#out + 1] = remaining
    out[#out + 1] = math.ceil(new_tat - now)
  end
end

local base = 7 + nb * 2
for j = 1, nbud do
  local limit = tonumber(ARGV[base + (j - 1) * 3 + 1])
  local cost = tonumber(ARGV[base + (j - 1) * 3 + 2])
  local ttl = tonumber(ARGV[base + (j - 1) * 3 + 3])
  local used = tonumber(redis.call('GET', KEYS[nb + j]) or '0')
  if used + cost > limit then
    if denied == 0 then
      denied = nb + j
      retry = ttl
    end
    local remaining = limit - used
    if remaining < 0 then remaining = 0 end
    out[#out + 1] = remaining
  else
    out[#out + 1] = limit - used - cost
  end
  out[#out + 1] = ttl
end

if has_conc == 1 then
  local ck = KEYS[nb + nbud + 1]
  redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
  if redis.call('ZCARD', ck) >= conc_limit and denied == 0 then
    denied = nb + nbud + 1
    retry = 1000
  end
end

if denied == 0 then
  for i = 1, nb do
    local new_tat = new_tats[i]
    -- %.17g keeps every bit of the double: the same TATs as the in-process store
    redis.call('SET', KEYS[i], string.format('%.17g', new_tat), 'PX',
               math.ceil(new_tat - now) + 1000)
  end
  for j = 1, nbud do
    local cost = tonumber(ARGV[base + (j - 1) * 3 + 2])
    local ttl = tonumber(ARGV[base + (j - 1) * 3 + 3])
    redis.call('INCRBY', KEYS[nb + j], cost)
    if redis.call('PTTL', KEYS[nb + j]) < 0 then
      redis.call('PEXPIRE', KEYS[nb + j], ttl + 60000)
    end
  end
  if has_conc == 1 then
    local ck = KEYS[nb + nbud + 1]
    redis.call('ZADD', ck, now + lease_ms, lease_id)
    redis.call('PEXPIRE', ck, lease_ms + 1000)
  end
end

local result = {denied == 0 and 1 or 0, denied, math.ceil(retry)}
for k = 1, #out do result[#result + 1] = out[k] end
return result

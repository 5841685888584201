-- Take what another store counted (the in-process fallback while Redis was away), keeping
-- for each limit the larger of the two. One cluster slot: the keys share the team's tag.
--
-- KEYS: one per limit.
-- ARGV: now_ms (empty: the server's clock), then per key: kind ("bucket" or "budget"),
--       value (a bucket's TAT as ms ahead of now; a budget's tokens used), ttl_ms (budgets).

local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
for i = 1, #KEYS do
  local kind = ARGV[2 + (i - 1) * 3]
  local value = tonumber(ARGV[3 + (i - 1) * 3])
  local ttl = tonumber(ARGV[4 + (i - 1) * 3])
  if kind == 'bucket' then
    local tat = now + value
    local held = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat > held then
      redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', math.ceil(value) + 1000)
    end
  else
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    if value > used then
      redis.call('SET', KEYS[i], math.floor(value), 'PX', ttl + 60000)
    end
  end
end
return 1

-- Add records to one sink's stream, each at most once: a record whose idempotency key was
-- added in the last `ttl_ms` is skipped, so that a put retried after a lost reply, or
-- forwarded again from the local spool after a crash, is not delivered twice.
--
-- KEYS: the sink's stream.
-- ARGV: ttl_ms, the prefix of the "seen" marks (under the stream's hash tag, so in its
--       cluster slot), then per record: idempotency key, data.
-- Returns the number of records added.

local stream = KEYS[1]
local ttl = tonumber(ARGV[1])
local seen = ARGV[2]
local added = 0
for i = 3, #ARGV, 2 do
  if redis.call('SET', seen .. ARGV[i], 1, 'NX', 'PX', ttl) then
    redis.call('XADD', stream, '*', 'k', ARGV[i], 'd', ARGV[i + 1])
    added = added + 1
  end
end
return added

-- Release a single-flight lock only if this holder still owns it (it may have expired and
-- been taken by another replica meanwhile).
-- KEYS[1] lock key; ARGV[1] the holder's token. Returns 1 when released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0

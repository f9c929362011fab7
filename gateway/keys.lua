-- API key scripts for gateway/keys.py (KeyStore), loaded once and run with EVALSHA.
-- KEYS (one Redis Cluster slot: the {keys} hash tag):
--   1 <p>:{keys}:records   id -> JSON record
--   2 <p>:{keys}:by_hash   hex HMAC -> id
--   3 <p>:{keys}:revoked   set of the hex HMACs of deleted keys

-- @script create
-- ARGV: id hash record mode, where mode is 'new' (a generated key), 'import' (an operator's
-- key: its revocation, if any, is lifted) or 'restore' (a key of the gateway's configuration:
-- not if it was revoked). Returns {1, id} created, {0, existing id} already there, {-1, ''}
-- revoked (restore only).
local existing = redis.call('HGET', KEYS[2], ARGV[2])
if existing and redis.call('HEXISTS', KEYS[1], existing) == 1 then
  return {0, existing}
end
if ARGV[4] == 'restore' and redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then
  return {-1, ''}
end
if ARGV[4] == 'import' then redis.call('SREM', KEYS[3], ARGV[2]) end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, ARGV[1]}

-- @script lookup
-- ARGV: hash. The record's JSON, or false.
local id = redis.call('HGET', KEYS[2], ARGV[1])
if not id then return false end
return redis.call('HGET', KEYS[1], id)

-- @script replace
-- KEYS: records. ARGV: id old_json new_json. Compare-and-set; 1 when replaced.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1

-- @script delete
-- ARGV: id. Deletes the record and its hash entry, records the revocation; 1 when deleted.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local h = cjson.decode(raw)['key_hash']
redis.call('HDEL', KEYS[1], ARGV[1])
if h then
  if redis.call('HGET', KEYS[2], h) == ARGV[1] then redis.call('HDEL', KEYS[2], h) end
  redis.call('SADD', KEYS[3], h)
end
return 1

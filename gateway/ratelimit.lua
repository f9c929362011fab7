-- Admission scripts for gateway/ratelimit.py, loaded once and run with EVALSHA.
-- KEYS (one Redis Cluster slot: the API key id is the hash tag):
--   1 <p>:{id}:rq   requests log (sorted set: request id -> admission ms)
--   2 <p>:{id}:tk   token reservations (sorted set: '<request id>:<tokens>' -> admission ms)
--   3 <p>:{id}:tks  sum of the tokens in KEYS[2]
--   4 <p>:{id}:cc   concurrency leases (sorted set: request id -> lease expiry ms)
-- Time comes from the server (TIME) so replicas with skewed clocks agree.

-- @script admit
-- ARGV: rpm tpm max_conc reserve request_id window_ms lease_ms (a limit of 0 = unlimited).
-- Returns {admitted, limit_index, retry_ms, requests_in_window, tokens_in_window,
-- reset_requests_ms, reset_tokens_ms, never_fits}.
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, rid = tonumber(ARGV[4]), ARGV[5]
local window, lease = tonumber(ARGV[6]), tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - window
local limited, retry, never = 0, 0, 0
local rcount, tsum = 0, 0

local function tokens_of(member) return tonumber(string.match(member, ':(%d+)$')) end
local function oldest_age_left(key)
  local e = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #e == 0 then return 0 end
  return tonumber(e[2]) + window - now
end

if tpm > 0 and reserve > tpm then
  -- can never fit: refuse at once, touching nothing
  limited, never, retry = 2, 1, window
end

if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  rcount = redis.call('ZCARD', KEYS[1])
  if limited == 0 and rcount >= rpm then
    -- the (rcount - rpm + 1)-th oldest entry must leave the window
    local e = redis.call('ZRANGE', KEYS[1], rcount - rpm, rcount - rpm, 'WITHSCORES')
    limited, retry = 1, math.max(retry, tonumber(e[2]) + window - now)
  end
end

if tpm > 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  local sum = redis.call('GET', KEYS[3])
  if #old > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  end
  if redis.call('EXISTS', KEYS[2]) == 0 then
    tsum = 0
    redis.call('DEL', KEYS[3])
  elseif not sum then
    -- the sum was lost (expired a tick apart): rebuild it from the log
    for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do tsum = tsum + tokens_of(m) end
    redis.call('SET', KEYS[3], tsum)
  else
    local freed = 0
    for i = 1, #old do freed = freed + tokens_of(old[i]) end
    tsum = math.max(0, tonumber(sum) - freed)
    if freed > 0 then redis.call('SET', KEYS[3], tsum) end
  end
  if never == 0 and tsum + reserve > tpm then
    -- walk the log from the oldest until enough tokens would have left the window
    local need, freed = tsum + reserve - tpm, 0
    local wait = window
    local log = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    for i = 1, #log, 2 do
      freed = freed + tokens_of(log[i])
      if freed >= need then wait = tonumber(log[i + 1]) + window - now; break end
    end
    if limited == 0 then limited = 2 end
    retry = math.max(retry, wait)
  end
end

if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  local ccount = redis.call('ZCARD', KEYS[4])
  if ccount >= conc then
    -- the soonest a slot can free for sure: when the oldest lease expires (a dead holder's
    -- does then; a live request may end sooner, or keep renewing)
    local e = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    if limited == 0 then limited = 3 end
    retry = math.max(retry, tonumber(e[2]) - now)
  end
end

if limited == 0 then
  local expire_at = now + window
  if rpm > 0 then
    redis.call('ZADD', KEYS[1], now, rid)
    redis.call('PEXPIREAT', KEYS[1], expire_at)
    rcount = rcount + 1
  end
  if tpm > 0 and reserve > 0 then
    redis.call('ZADD', KEYS[2], now, rid .. ':' .. ARGV[4])
    tsum = redis.call('INCRBY', KEYS[3], reserve)
    -- same absolute deadline for both, so the log and its sum expire together
    redis.call('PEXPIREAT', KEYS[2], expire_at)
    redis.call('PEXPIREAT', KEYS[3], expire_at)
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[4], now + lease, rid)
    local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', KEYS[4], tonumber(last[2]))
  end
end

local rreset, treset = 0, 0
if rpm > 0 then rreset = oldest_age_left(KEYS[1]) end
if tpm > 0 then treset = oldest_age_left(KEYS[2]) end
return {limited == 0 and 1 or 0, limited, math.max(retry, 0), rcount, tsum, rreset, treset, never}

-- @script settle
-- ARGV: request_id reserved used window_ms. Frees the slot, settles the reservation.
local rid, reserved, used = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local window = tonumber(ARGV[4])
redis.call('ZREM', KEYS[4], rid)
if reserved > 0 then
  -- members are built from the decimal strings Python sent, never from Lua numbers
  local member = rid .. ':' .. ARGV[2]
  local score = redis.call('ZSCORE', KEYS[2], member)
  if score then
    -- still inside the window: keep the admission time, correct the amount
    redis.call('ZREM', KEYS[2], member)
    if used > 0 then redis.call('ZADD', KEYS[2], score, rid .. ':' .. ARGV[3]) end
    if redis.call('EXISTS', KEYS[2]) == 0 then
      redis.call('DEL', KEYS[3])
    else
      local sum = redis.call('GET', KEYS[3])
      if sum then
        sum = tonumber(sum) + used - reserved
      else
        -- the sum was lost (expired a tick apart): rebuild it from the log
        sum = 0
        for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
          sum = sum + tonumber(string.match(m, ':(%d+)$'))
        end
      end
      local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
      local expire_at = tonumber(last[2]) + window
      redis.call('SET', KEYS[3], math.max(sum, 0))
      redis.call('PEXPIREAT', KEYS[2], expire_at)
      redis.call('PEXPIREAT', KEYS[3], expire_at)
    end
  end
end
return 1

-- @script renew
-- KEYS[1] <p>:{id}:cc. ARGV: lease_ms request_id... Extends the leases of live requests, and
-- puts back any that is gone (Redis lost its data) or expired (a stall outlived it): the
-- requests still run, so the count stays true. Returns how many were gone or expired.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
local lost = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not score or tonumber(score) <= now then lost = lost + 1 end
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return lost

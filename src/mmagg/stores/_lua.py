"""Lua scripts of the Redis store: every read-modify-write on shared state runs in one.

Every script gets ``KEYS = [best, stats, meta, clock]`` (hashes of one aggregator key and
its interval clock) and the same leading arguments::

    ARGV[1] ttl (ms)     ARGV[2] max_classes   ARGV[3] rejected   ARGV[4] dropped
    ARGV[5] frequency    ARGV[6] now ("" = Redis TIME)
    ARGV[7..] triples: field, best value, stats value ("" when none)

so each call merges the caller's pending window first (a push costs no extra round trip).
A field is the JSON array ``[model_id, class_name, source_id]``; a best value is the JSON
array ``[confidence, seen_at, seq, inference_id, model_type]``; a stats value is the JSON
array ``[count, sum, min, max, h0, ..., h9]``. Numbers are written with 17 significant
digits so that doubles survive the round trip exactly.
"""

from __future__ import annotations

__all__ = ["CLAIM", "MERGE", "TAKE"]

_PRELUDE = r"""
local best_key, stats_key, meta_key, clock_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl = tonumber(ARGV[1])
local max_classes = tonumber(ARGV[2])
local rejected = tonumber(ARGV[3])
local dropped = tonumber(ARGV[4])

-- Byte order equals code point order for UTF-8; Lua's "<" would follow the server locale.
local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- Sample.rank(): higher confidence, then earlier seen_at, seq, inference_id, model_type.
local function better(a, b)
  if a[1] ~= b[1] then return a[1] > b[1] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  if a[3] ~= b[3] then return a[3] < b[3] end
  if a[4] ~= b[4] then return bytes_lt(a[4], b[4]) end
  if a[5] ~= b[5] then return bytes_lt(a[5], b[5]) end
  return false
end

local function num(x)
  if x == math.huge then return '1e999' end
  if x == -math.huge then return '-1e999' end
  return string.format('%.17g', x)
end

local function merged_stats(mine, theirs)
  local a, b = cjson.decode(mine), cjson.decode(theirs)
  a[1] = a[1] + b[1]
  a[2] = a[2] + b[2]
  if b[3] < a[3] then a[3] = b[3] end
  if b[4] > a[4] then a[4] = b[4] end
  for i = 5, #a do a[i] = a[i] + b[i] end
  local out = {}
  for i = 1, #a do out[i] = num(a[i]) end
  return '[' .. table.concat(out, ',') .. ']'
end

-- Window._merge_entries, entry by entry, in the order the caller sent them.
local function merge_window()
  local size = redis.call('HLEN', best_key)
  for i = 7, #ARGV, 3 do
    local field, value, stats = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local current = redis.call('HGET', best_key, field)
    if not current then
      if size >= max_classes then
        if stats ~= '' then
          dropped = dropped + cjson.decode(stats)[1]
        else
          dropped = dropped + 1
        end
      else
        redis.call('HSET', best_key, field, value)
        if stats ~= '' then redis.call('HSET', stats_key, field, stats) end
        size = size + 1
      end
    else
      if better(cjson.decode(value), cjson.decode(current)) then
        redis.call('HSET', best_key, field, value)
      end
      if stats ~= '' then
        local mine = redis.call('HGET', stats_key, field)
        if mine then
          redis.call('HSET', stats_key, field, merged_stats(mine, stats))
        else
          redis.call('HSET', stats_key, field, stats)
        end
      end
    end
  end
  if rejected > 0 then redis.call('HINCRBY', meta_key, 'rejected', rejected) end
  if dropped > 0 then redis.call('HINCRBY', meta_key, 'dropped', dropped) end
  if #ARGV >= 7 or rejected > 0 or dropped > 0 then
    -- Refreshed on every write: keys nobody writes to any more expire.
    redis.call('PEXPIRE', best_key, ttl)
    redis.call('PEXPIRE', stats_key, ttl)
    redis.call('PEXPIRE', meta_key, ttl)
  end
end

-- Read and delete the merged window: {1, "0", best pairs, stats pairs, {rejected, dropped}}.
local function take_window()
  local best = redis.call('HGETALL', best_key)
  local stats = redis.call('HGETALL', stats_key)
  local meta = {
    redis.call('HGET', meta_key, 'rejected') or '0',
    redis.call('HGET', meta_key, 'dropped') or '0',
  }
  redis.call('DEL', best_key, stats_key, meta_key)
  return {1, '0', best, stats, meta}
end
"""

#: Merge the window in ``ARGV`` into the shared one. Returns 1.
MERGE = (
    _PRELUDE
    + r"""
merge_window()
return 1
"""
)

#: Merge, then read and delete the whole shared window (flush / close): no clock involved.
TAKE = (
    _PRELUDE
    + r"""
merge_window()
return take_window()
"""
)

#: Merge, then claim the interval on one clock for every host (Redis ``TIME``).
#: Returns ``{0, elapsed}`` when not due (``elapsed`` "0" on the first call, which starts
#: the interval) and the taken window when this caller wins; the interval restarts then.
CLAIM = (
    _PRELUDE
    + r"""
merge_window()
local now
if ARGV[6] ~= '' then
  now = tonumber(ARGV[6])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local frequency = tonumber(ARGV[5])
local last = redis.call('GET', clock_key)
if not last then
  redis.call('SET', clock_key, num(now), 'PX', ttl)
  return {0, '0'}
end
local elapsed = now - tonumber(last)
-- int() of the Python memory store: truncation towards zero.
local whole = elapsed >= 0 and math.floor(elapsed) or math.ceil(elapsed)
if whole < frequency then
  redis.call('PEXPIRE', clock_key, ttl)
  return {0, num(elapsed)}
end
redis.call('SET', clock_key, num(now), 'PX', ttl)
return take_window()
"""
)

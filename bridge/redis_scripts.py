"""The Lua scripts of the Redis broker: each check and the write it guards, in one step.

Redis runs a script whole, with nothing of another client in between: a limit is
checked and counted, an append is fenced against a process that was reaped, in
one atomic step.  Keys are passed in ``KEYS`` where a script's keys are known
beforehand; the scripts that walk the set of processes build the keys of each
from the prefix (``ARGV[1]``), which a single Redis server allows.

Scripts that write a list of commands take them flattened after their own
arguments: ``n, name, arg…`` for each command, ``n`` counting the name and its
arguments (see :func:`flatten`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

#: Runs the flattened commands from ``ARGV[start]`` on.
_EXEC: Final = """
local function exec(start)
  local i = start
  while i <= #ARGV do
    local n = tonumber(ARGV[i])
    redis.call(unpack(ARGV, i + 1, i + n))
    i = i + n + 1
  end
end
"""

#: The appends and status writes of many runs by the process executing them, in
#: one step: the fence is checked once for all of them.
#: KEYS[1] the process's fence marker; ARGV[1] the process, ARGV[2] the writes as
#: JSON: ``[[run hash, if_recorded, [name, arg…], …], …]``, each argument a string or
#: a number (given to the command with 17 significant digits: a float is kept exactly).
#: Answers one reply per write: 1 written; 0 refused, once the process was reaped or
#: where the run is recorded as another's (a run whose record Redis lost, restarted
#: without persistence, is written again); 2 not written because the run's record
#: is missing and ``if_recorded`` is 1 (the caller sends the record with it then);
#: an error's text when one of the write's commands failed.
FENCED_WRITES: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local function apply(write)
  for j = 3, #write do
    redis.call(unpack(write[j]))
  end
end
local out = {}
for i, write in ipairs(cjson.decode(ARGV[2])) do
  local node = redis.call('HGET', write[1], 'node')
  if node and node ~= ARGV[1] then
    out[i] = 0
  elseif not node and write[2] == 1 then
    out[i] = 2
  else
    local ok, err = pcall(apply, write)
    if ok then
      out[i] = 1
    else
      if type(err) == 'table' then err = err.err end
      out[i] = 'ERR ' .. tostring(err)
    end
  end
end
return out
"""

#: The ending of a run whose process was lost, written once whoever writes it.
#: KEYS[1] the run's hash; ARGV[1] the process that executed it, ARGV[2] the run's
#: last seq the ending follows, ARGV[3] 1 to write it even where Redis lost the
#: record.  Refused (0) when the run ended or moved on meanwhile.
END_LOST_RUN: Final = (
    _EXEC
    + """
local f = redis.call('HMGET', KEYS[1], 'node', 'status', 'last_seq')
if not f[1] then
  if ARGV[3] ~= '1' then return 0 end
else
  if f[1] ~= ARGV[1] then return 0 end
  if f[2] == 'completed' or f[2] == 'cancelled' or f[2] == 'failed' then return 0 end
  if tonumber(f[3] or '0') ~= tonumber(ARGV[2]) then return 0 end
end
exec(4)
return 1
"""
)

#: Renew this process's lease, unless it was reaped meanwhile (0).
#: KEYS[1] the lease, KEYS[2] the fence marker, KEYS[3] the set of processes;
#: ARGV[1] the lease's value, ARGV[2] its length in ms, ARGV[3] the process.
RENEW_LEASE: Final = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""

#: Claim the reaping of a process whose lease lapsed, and fence it (1), else 0.
#: KEYS[1] its lease, KEYS[2] its fence marker, KEYS[3] the reaping lock;
#: ARGV[1] the reaper, ARGV[2] how long the fence marker is kept (s).
CLAIM_LOST_NODE: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'EX', 30) then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return 1
"""

#: Open a connection of a user if the count over every live process allows it.
#: KEYS[1] the set of processes; ARGV[1] the prefix, ARGV[2] this process,
#: ARGV[3] the user, ARGV[4] the limit.  1 when counted, 0 when refused.
OPEN_CONNECTION: Final = """
local total = 0
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if n == ARGV[2] or redis.call('EXISTS', ARGV[1] .. 'node:' .. n) == 1 then
    total = total + tonumber(redis.call('HGET', ARGV[1] .. 'conns:' .. n, ARGV[3]) or '0')
  end
end
if total >= tonumber(ARGV[4]) then return 0 end
redis.call('HINCRBY', ARGV[1] .. 'conns:' .. ARGV[2], ARGV[3], 1)
return 1
"""

#: Reserve a run start: the active-runs limit, then the sliding window, then count.
#: KEYS[1] the user's active runs (set), KEYS[2] their starts under way (zset,
#: scored by expiry), KEYS[3] their recent starts (zset, scored by time).
#: ARGV: now, window (s), max active, per window, token, how long a reservation holds.
#: Answers {0} granted, {1, active} refused for the active limit, {2, oldest} for the
#: window (the time of the oldest start in it).
RESERVE_RUN: Final = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local active = redis.call('SCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if active >= tonumber(ARGV[3]) then return {1, tostring(active)} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  return {2, oldest[2]}
end
local hold = tonumber(ARGV[6])
redis.call('ZADD', KEYS[2], now + hold, ARGV[5])
redis.call('EXPIRE', KEYS[2], math.ceil(hold) + 1)
redis.call('ZADD', KEYS[3], now, ARGV[5])
redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[2])) + 1)
return {0}
"""

#: Set this process's watcher count of a run; the total over live processes.
#: KEYS[1] the run's watchers (hash), KEYS[2] the runs this process watches (set);
#: ARGV[1] the prefix, ARGV[2] this process, ARGV[3] its count, ARGV[4] the run.
#: The counts of processes whose lease lapsed are dropped on the way.
COUNT_WATCHERS: Final = """
if tonumber(ARGV[3]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[4])
else
  redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[4])
end
local total = 0
local counts = redis.call('HGETALL', KEYS[1])
for i = 1, #counts, 2 do
  local n = counts[i]
  if n == ARGV[2] or redis.call('EXISTS', ARGV[1] .. 'node:' .. n) == 1 then
    total = total + tonumber(counts[i + 1])
  else
    redis.call('HDEL', KEYS[1], n)
  end
end
return total
"""

#: Deletes an idempotency claim only while it is still the caller's.
RELEASE_KEY: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Command = Sequence[str | int | float]


def flatten(commands: Sequence[Command]) -> list[str | int | float]:
    """Commands as the scripts above take them: ``n, name, arg…`` for each."""
    out: list[str | int | float] = []
    for command in commands:
        out.append(len(command))
        out.extend(command)
    return out

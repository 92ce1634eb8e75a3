"""The Redis functions library: every Lua script the roles run, loaded by a trusted user.

Roles call these functions with ``FCALL`` only.  None of them needs ``EVAL``, ``EVALSHA`` or
``SCRIPT LOAD``: a user allowed those can run any Lua, and a ``while true do end`` makes
Redis answer ``BUSY`` to everyone.  ``FUNCTION LOAD`` belongs to an admin user
(``mailpool redis-setup``); a function runs with its caller's ACL rights, each command
inside it checked on its own, so ``FCALL`` grants nothing a role could not do directly.
Unlike the script cache, functions are kept in the RDB and AOF and reach replicas, so they
survive a restart and a failover.

Versions: the library is ``mailpool_v<N>`` and its functions ``mailpool_v<N>_<name>``, so
workers of two releases can run side by side during a rollout, each calling its own.  Any
change to the Lua below needs a new ``LIBRARY_VERSION`` (a test pins the code's digest to
the version).  ``mailpool_v<N>_version`` returns that digest: a role compares it with its
own at start and finds a library that is missing or not its own.

Keys: each function names the keys it is given (``KEYS``), except ``promote``, which
derives the payload hash of each due retry from the schedule member.  Redis Cluster allows
that too: the payload keys carry the partition's hash tag, so they share the schedule's slot.

Fields: the Lua spells no field name.  Entries arrive as field/value pairs that
:mod:`workers.streams.layout` built (``settle``, ``replay``) or that the payload hash holds
(``promote``), and are written as they come; the key names arrive as ``KEYS`` or, for the
retry payloads, as a prefix argument.  The only words the Lua and Python share are the
section kinds of ``settle``, formatted into the Lua from the constants below.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from workers.errors import ConfigError

LIBRARY_VERSION = 2
LIBRARY_PREFIX = "mailpool_v"
LIBRARY = f"{LIBRARY_PREFIX}{LIBRARY_VERSION}"
SETTLE = f"{LIBRARY}_settle"
PROMOTE = f"{LIBRARY}_promote"
REPLAY = f"{LIBRARY}_replay"
REMOVE_IDLE_CONSUMER = f"{LIBRARY}_remove_idle_consumer"
VERSION = f"{LIBRARY}_version"

# The kinds of section a settle call carries after its accepted recipients.
SECTION_DEAD = "dead"
SECTION_RETRY = "retry"
SECTION_EVENT = "event"
# An event of recipients the relay accepted: also written for an entry a failover left unread.
SECTION_ACCEPTED_EVENT = "accepted-event"

SETUP_HINT = "run `mailpool redis-setup` as a Redis user allowed FUNCTION LOAD (deploy/README.md)"

_FUNCTIONS = f"""
-- settle: one read entry's outcome.  Records the recipients the relay accepted (HSETNX:
-- the first acceptance stays), then acknowledges the entry; its events, dead letters and
-- retry are written only when this XACK acknowledged it.  A second run of the same
-- settlement (its first reply was lost with the connection) or a settlement of an entry
-- another worker acknowledged first therefore writes nothing.  One exception: a failover
-- can take back the read (the new primary never saw the XREADGROUP), so the entry is
-- unread in the group and XACK finds nothing to acknowledge.  When this run recorded an
-- acceptance (so it is the first run), the events of the accepted recipients are written
-- all the same (the sends happened; the entry read again finds them recorded); its other
-- events, dead letters and retry are not: that read attempts those recipients again.
-- KEYS: 1 send stream, 2 dead stream, 3 events stream, 4 retry schedule, 5 retry payload
--       hash, 6 sent hash
-- ARGV: 1 group, 2 entry id, 3 now, 4 sent ttl (s), 5 events maxlen, 6 n accepted, then n
--       recipients, then sections: kind ("dead"|"retry"|"event"|"accepted-event"), n
--       pairs, due, pairs

-- True when stream id a comes after stream id b ('<ms>-<seq>').
local function after(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if not a_ms or not b_ms then
    return false
  end
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  return a_ms > b_ms or (a_ms == b_ms and tonumber(a_seq) > tonumber(b_seq))
end

-- True when the group has not read the entry: past its last-delivered id.
local function unread(stream, group, id)
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for k = 1, #info, 2 do
      if info[k] == 'name' then name = info[k + 1] end
      if info[k] == 'last-delivered-id' then last = info[k + 1] end
    end
    if name == group then
      return last ~= nil and after(id, last)
    end
  end
  return false
end

local function settle(keys, args)
  local n = tonumber(args[6])
  local recorded = 0
  for j = 1, n do
    recorded = recorded + redis.call('HSETNX', keys[6], args[6 + j], args[3])
  end
  if recorded > 0 then
    redis.call('EXPIRE', keys[6], args[4])
  end
  local events_only = false  -- only the accepted recipients' events
  if redis.call('XACK', keys[1], args[1], args[2]) == 0 then
    if recorded == 0 or not unread(keys[1], args[1], args[2]) then
      return 0
    end
    events_only = true
  end
  local i = 7 + n
  while i <= #args do
    local kind = args[i]
    local pairs_count = tonumber(args[i + 1])
    local due = args[i + 2]
    local fields = {{unpack(args, i + 3, i + 2 + 2 * pairs_count)}}
    i = i + 3 + 2 * pairs_count
    if kind == '{SECTION_ACCEPTED_EVENT}' then
      redis.call('XADD', keys[3], 'MAXLEN', '~', args[5], '*', unpack(fields))
    elseif events_only then
      -- the entry read again attempts the recipients not accepted
    elseif kind == '{SECTION_EVENT}' then
      redis.call('XADD', keys[3], 'MAXLEN', '~', args[5], '*', unpack(fields))
    elseif kind == '{SECTION_DEAD}' then
      redis.call('XADD', keys[2], '*', unpack(fields))
    elseif kind == '{SECTION_RETRY}' then
      redis.call('DEL', keys[5])
      redis.call('HSET', keys[5], unpack(fields))
      redis.call('ZADD', keys[4], due, args[2])
    end
  end
  return 1
end

-- promote: move retries due by now back into the send stream.
-- KEYS: 1 retry schedule, 2 send stream.  ARGV: 1 now, 2 limit, 3 payload key prefix.
local function promote(keys, args)
  local due = redis.call('ZRANGEBYSCORE', keys[1], '-inf', args[1], 'LIMIT', 0, args[2])
  for _, member in ipairs(due) do
    local key = args[3] .. member
    local fields = redis.call('HGETALL', key)
    if #fields > 0 then
      redis.call('XADD', keys[2], '*', unpack(fields))
    end
    redis.call('DEL', key)
    redis.call('ZREM', keys[1], member)
  end
  return #due
end

-- replay: move one dead letter back to the send stream; nil when it is gone.
-- KEYS: 1 dead stream, 2 send stream.  ARGV: dead entry id, then field pairs of the entry.
local function replay(keys, args)
  if redis.call('XDEL', keys[1], args[1]) == 0 then
    return false
  end
  return redis.call('XADD', keys[2], '*', unpack(args, 2))
end

-- remove_idle_consumer: delete a consumer only when nothing is pending on it, in one step,
-- so an entry read meanwhile under the same name is never dropped from the pending list.
-- KEYS: stream.  ARGV: group, consumer.  Returns the consumer's pending count (0: removed).
local function remove_idle_consumer(keys, args)
  local summary = redis.call('XPENDING', keys[1], args[1])
  for _, row in ipairs(summary[4] or {{}}) do
    if row[1] == args[2] then
      return tonumber(row[2])
    end
  end
  redis.call('XGROUP', 'DELCONSUMER', keys[1], args[1], args[2])
  return 0
end

redis.register_function('{SETTLE}', settle)
redis.register_function('{PROMOTE}', promote)
redis.register_function('{REPLAY}', replay)
redis.register_function('{REMOVE_IDLE_CONSUMER}', remove_idle_consumer)
"""

# The digest of the functions' code: what `version` answers, so a role can tell its own
# library from another build's loaded under the same name.
DIGEST = hashlib.sha256(_FUNCTIONS.encode()).hexdigest()[:16]
LIBRARY_CODE = f"""#!lua name={LIBRARY}
{_FUNCTIONS}
redis.register_function{{function_name='{VERSION}', flags={{'no-writes'}},
                         callback=function() return '{DIGEST}' end}}
"""


class FunctionsNotLoaded(ResponseError):
    """This build's library is not in Redis and this user may not load it.

    A Redis error, so the loops that retry Redis failures (settlement, promotion,
    housekeeping) log it and try again; at start it becomes a :class:`ConfigError`.
    """

    def __init__(self, found: str | None) -> None:
        what = "is not loaded" if found is None else f"is another build's (digest {found})"
        super().__init__(f"the Redis functions library {LIBRARY} {what}: {SETUP_HINT}")


def is_function_missing(exc: ResponseError) -> bool:
    return "function not found" in str(exc).lower()


async def loaded_digest(redis: aioredis.Redis) -> str | None:
    """The digest of the ``mailpool_v<N>`` library in Redis; None when it is not loaded."""
    try:
        reply = await redis.fcall(VERSION, 0)
    except ResponseError as exc:
        if is_function_missing(exc):
            return None
        raise
    return reply.decode() if isinstance(reply, bytes) else str(reply)


async def load_library(redis: aioredis.Redis) -> None:
    """``FUNCTION LOAD REPLACE`` of this build's library (needs an admin-like user)."""
    await redis.function_load(LIBRARY_CODE, replace=True)


async def ensure_library(redis: aioredis.Redis) -> bool:
    """Make sure this build's library is loaded; True when this call loaded it.

    A user allowed ``FUNCTION LOAD`` (the embedded Redis of ``mailpool run``, a development
    Redis without ACLs) loads it itself; any other gets :class:`FunctionsNotLoaded`.
    """
    found = await loaded_digest(redis)
    if found == DIGEST:
        return False
    try:
        await load_library(redis)
    except NoPermissionError:
        raise FunctionsNotLoaded(found) from None
    return True


async def require_library(redis: aioredis.Redis) -> None:
    """At a role's start: one line and exit status 2 when the library cannot be had."""
    try:
        await ensure_library(redis)
    except FunctionsNotLoaded as exc:
        raise ConfigError(str(exc)) from None
    except NoPermissionError as exc:  # an ACL file from before the functions
        raise ConfigError(
            f"this Redis user may not call mailpool's functions ({exc}): give it +fcall, "
            "as deploy/redis/users.acl does"
        ) from None


async def fcall(
    redis: aioredis.Redis, name: str, keys: Sequence[str], args: Sequence[str | bytes | int | float]
) -> Any:
    """``FCALL name``; a library gone meanwhile (``FUNCTION FLUSH``, a Redis restarted without
    its data) is loaded again where this user may, else :class:`FunctionsNotLoaded`."""
    try:
        return await redis.fcall(name, len(keys), *keys, *args)
    except ResponseError as exc:
        if not is_function_missing(exc):
            raise
    await ensure_library(redis)
    return await redis.fcall(name, len(keys), *keys, *args)

"""Stream plumbing: Redis keys, connections, consumer groups, claims, retries, dead letters.

Everything that knows how mailpool lays out its data in Redis lives in this package; the
roles (ingest, delivery, listen) call it and never spell a key or a field themselves.

* :mod:`.layout`: every key and every entry's fields (encoders, decoders), the stream-id
  helpers and the status snapshot's types; pure, no I/O.  The one place to read first.
* :mod:`.connection`: clients (URLs, timeouts, retries); :mod:`.consumer`: consumer groups;
  :mod:`.receive`: ingest's appends; :mod:`.outcomes`: delivery's settlements, retries and
  replays; :mod:`.functions`: the Redis functions they run; :mod:`.snapshot`: what
  ``mailpool status`` and the gauges read; :mod:`.retry`: the back-off schedule.
* :mod:`.redis_fence`, :mod:`.hiredis_fence`: every use of redis-py and hiredis below the
  command API, with the releases checked and what each buys (tests/test_internals_redis.py).

Nothing here imports a role, a command or their config (tests/test_layering.py).
"""

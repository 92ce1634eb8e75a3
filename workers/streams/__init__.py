"""Stream plumbing: Redis keys, connections, consumer groups, claims, retries, dead letters.

Everything that knows how mailpool lays out its data in Redis lives in this package; the
roles (ingest, delivery, listen) call it and never spell a key themselves.
"""

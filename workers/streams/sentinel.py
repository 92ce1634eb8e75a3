"""Redis Sentinel URLs, and clients of the master a Sentinel names.

``redis+sentinel://[user:password@]host:port,host:port,.../<master name>[/<db>]`` (and
``rediss+sentinel://`` for TLS to the Sentinels and the Redis servers alike).  The user and
password are the Redis servers' (as in ``redis://``); a Sentinel that wants a password of its
own gets it from ``?sentinel_password=``, which the ``--sentinel-password`` option (or its
file, or ``MAILPOOL_SENTINEL_PASSWORD``) puts there.  A port left out is Sentinel's 26379.
The query may also carry the TLS files of ``rediss+sentinel://``: ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile`` and ``ssl_cert_reqs``; anything else is refused.

A client asks the Sentinels for the master's address each time it opens a connection
(redis-py's :class:`~redis.asyncio.sentinel.SentinelConnectionPool`), and a connection to a
master that became a replica fails with ``READONLY`` turned into a connection error, so
connections follow the master across a failover: while no Sentinel names a reachable master
every command fails at once (ingest answers 451), and the first one after the failover goes
to the new master.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff

from workers.errors import ConfigError, mask_url_password
from workers.streams import redis_fence

SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_PORT = 26379
PASSWORD_PARAMETER = "sentinel_password"  # noqa: S105 - the name, not a password
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
# A question to a Sentinel (where is the master?) is answered at once or not at all: one
# that does not answer within this is skipped for the next, so a Sentinel that hangs adds
# this much to a connection, and never blocks a write's own deadline.
SENTINEL_TIMEOUT = 1.0


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SCHEMES


@dataclass(frozen=True)
class SentinelTarget:
    """What a Sentinel URL says: where the Sentinels are and which master to ask for."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls_options: dict[str, str] = field(default_factory=dict)

    def master_client(self, **options: Any) -> aioredis.Redis:
        """A client of the current master; ``options`` as for ``Redis.from_url``."""
        common: dict[str, Any] = dict(self.tls_options)
        if self.tls:
            common["ssl"] = True
        sentinel_options = {
            **common,
            "password": self.sentinel_password,
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            # The next Sentinel is asked instead of this one again.
            "retry": Retry(NoBackoff(), 0),
        }
        sentinel = ReadableSentinel(list(self.sentinels), sentinel_kwargs=sentinel_options)
        client: SentinelMasterClient = sentinel.master_for(
            self.master,
            redis_class=SentinelMasterClient,
            username=self.username,
            password=self.password,
            db=self.db,
            **common,
            **options,
        )
        client.owned_sentinel = sentinel
        return client


class ReadableSentinel(Sentinel):
    """redis-py's Sentinel client, whose "no master" error says what each Sentinel answered
    without the repr of every client and connection (a few thousand characters a line)."""

    async def discover_master(self, service_name: str) -> Any:
        try:
            return await super().discover_master(service_name)
        except MasterNotFoundError as exc:
            said = redis_fence.readable_master_not_found(str(exc), service_name)
            raise MasterNotFoundError(said) from None


class SentinelMasterClient(aioredis.Redis):
    """A client of the master a Sentinel names; closing it closes its Sentinel clients too
    (``client()`` copies share its pool and leave them open)."""

    owned_sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        closes_pool = close_connection_pool or (
            close_connection_pool is None and self.auto_close_connection_pool
        )
        await super().aclose(close_connection_pool)
        if closes_pool and self.owned_sentinel is not None:
            await redis_fence.close_sentinel(self.owned_sentinel)
            self.owned_sentinel = None


def parse_sentinel_url(url: str, what: str = "--redis-url") -> SentinelTarget:
    """The target of a Sentinel URL; ConfigError (one line, password masked) when it is
    not one mailpool can use."""
    shown = mask_url_password(url)

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{what} {shown!r}: {problem} (expected {_FORM})")

    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SCHEMES:
        raise bad("not a Sentinel URL")
    try:
        parts = urlsplit("x://" + rest)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parts.fragment:
        raise bad("a '#' part")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    master, db = _master_and_db(parts.path, bad)
    query = _query(parts.query, bad)
    tls = SCHEMES[scheme.lower()]
    tls_options = {name: query[name] for name in TLS_OPTIONS if name in query}
    if tls_options and not tls:
        raise bad(f"{', '.join(tls_options)} without TLS (rediss+sentinel://)")
    return SentinelTarget(
        sentinels=tuple(_sentinel_address(item, bad) for item in hosts.split(",")),
        master=master,
        db=db,
        tls=tls,
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinel_password=query.get(PASSWORD_PARAMETER) or None,
        tls_options=tls_options,
    )


_FORM = "redis+sentinel://[user@]host:port,host:port/<master name>[/db]"


def _master_and_db(path: str, bad: Any) -> tuple[str, int]:
    names = path.strip("/").split("/") if path.strip("/") else []
    if not names or not names[0]:
        raise bad("no master name")
    if len(names) > 2:
        raise bad("more than a master name and a database number in the path")
    db_text = names[1] if len(names) == 2 else "0"
    if not db_text.isdigit():
        raise bad(f"database {db_text!r} is not a number")
    return unquote(names[0]), int(db_text)


def _query(query: str, bad: Any) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise bad("an unreadable query") from None
    known = {PASSWORD_PARAMETER, *TLS_OPTIONS}
    unknown = sorted({name for name, _ in pairs} - known)
    if unknown:
        raise bad(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return dict(pairs)


def _sentinel_address(item: str, bad: Any) -> tuple[str, int]:
    """``host:port``, ``host`` (port 26379) or ``[v6]:port`` of one Sentinel."""
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise bad(f"bad address {item!r}")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
    elif ":" in item:
        host, _, port_text = item.rpartition(":")
    else:
        host, port_text = item, str(DEFAULT_PORT)
    if not host:
        raise bad(f"no host in {item!r}" if item else "an empty Sentinel address")
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise bad(f"bad port in {item!r} (1 to 65535)")
    return host, int(port_text)

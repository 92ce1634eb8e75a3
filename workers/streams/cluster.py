"""Redis Cluster URLs, and clients of the primary that owns one partition's hash slot.

``redis+cluster://[user:password@]host:port,host:port,...`` (``rediss+cluster://`` for TLS,
whose query may carry ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs``).  The addresses are seeds: any node of the cluster answers where each
slot lives.  A port left out is 6379.  A cluster has database 0 only: no path.

Why not redis-py's ``RedisCluster``: it has no ``connection_pool``, and mailpool's two hot
paths (settlements, ingest appends) write packed commands on a connection checked out of a
pool (:mod:`workers.streams.redis_fence`).  Every key of one partition shares one hash slot
(:func:`workers.streams.layout.partitions`), so a partition is served by one primary, and an
ordinary client whose connections connect to that primary does everything the standalone
code does.  Its connections (``redis_fence.SlotConnection``) ask the shared
:class:`ClusterTopology` for the primary at each connect.  A reply saying the slot lives
elsewhere now (``MOVED``, ``READONLY`` from a demoted primary, ``CLUSTERDOWN``,
``TRYAGAIN``) or a failed connect marks the topology stale and becomes a ConnectionError,
which every role treats as "Redis away, try again" (ingest answers 451, delivery runs the
settlement again); the next connect
reads the slots again, so the clients follow a failover.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from workers.errors import ConfigError, mask_url_password
from workers.streams.redis_fence import SlotConnection, SlotSSLConnection

SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
DEFAULT_PORT = 6379
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
# A node asked for the slots answers at once or is skipped for the next.
TOPOLOGY_TIMEOUT = 1.0
_FORM = "redis+cluster://[user@]host:port,host:port"


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and str(url).partition("://")[0].lower() in SCHEMES


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


@dataclass
class ClusterTopology:
    """Which primary serves each slot, read from any known node, again when marked stale."""

    seeds: tuple[tuple[str, int], ...]
    node_options: dict[str, Any] = field(default_factory=dict)  # auth and TLS of every node
    _ranges: list[tuple[int, int, str, int]] = field(default_factory=list)
    # Every primary a slot map named: asked too when the seeds do not answer (kept when the
    # map is marked stale).
    _learned: list[tuple[str, int]] = field(default_factory=list)
    _lock: asyncio.Lock | None = None

    def stale(self) -> None:
        self._ranges = []

    async def primary_of(self, slot: int) -> tuple[str, int]:
        if not self._ranges:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if not self._ranges:
                    self._ranges = await self._read_slots()
                    learned = [(host, port) for _, _, host, port in self._ranges]
                    self._learned = list(dict.fromkeys(self._learned + learned))
        for start, end, host, port in self._ranges:
            if start <= slot <= end:
                return host, port
        self.stale()
        raise RedisConnectionError(f"no node of the cluster serves slot {slot}")

    def _known_nodes(self) -> list[tuple[str, int]]:
        nodes = list(self.seeds)
        return nodes + [node for node in self._learned if node not in nodes]

    async def _read_slots(self) -> list[tuple[int, int, str, int]]:
        problems: list[str] = []
        for host, port in self._known_nodes():
            try:
                return await self._slots_from(host, port)
            except (RedisError, OSError) as exc:
                problems.append(f"{host}:{port}: {_problem(exc)}")
        raise RedisConnectionError("no cluster node answered: " + "; ".join(problems))

    async def _slots_from(self, host: str, port: int) -> list[tuple[int, int, str, int]]:
        return _slot_ranges(await self._ask(host, port, "CLUSTER SLOTS"), host)

    async def primaries(self) -> list[tuple[str, int]]:
        """Every primary of the cluster, with or without slots (``CLUSTER SHARDS`` of the
        first known node that answers): what per-node state, such as the functions
        library, must reach.  A replica is left out: it copies its primary."""
        problems: list[str] = []
        for host, port in self._known_nodes():
            try:
                return _shard_primaries(await self._ask(host, port, "CLUSTER SHARDS"), host)
            except (RedisError, OSError) as exc:
                problems.append(f"{host}:{port}: {_problem(exc)}")
        raise RedisConnectionError("no cluster node answered: " + "; ".join(problems))

    async def _ask(self, host: str, port: int, command: str) -> Any:
        node = aioredis.Redis(
            host=host, port=port, socket_timeout=TOPOLOGY_TIMEOUT,
            socket_connect_timeout=TOPOLOGY_TIMEOUT, **self.node_options,
        )  # fmt: skip
        try:
            asking = node.execute_command(command)  # type: ignore[no-untyped-call]
            return await asyncio.wait_for(asking, TOPOLOGY_TIMEOUT)
        finally:
            await node.aclose()


def _problem(exc: BaseException) -> str:
    """Why a node did not answer, in words (a timeout's own text is empty)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {TOPOLOGY_TIMEOUT:g} s"
    return str(exc) or type(exc).__name__


def _slot_ranges(reply: Any, asked: str) -> list[tuple[int, int, str, int]]:
    """CLUSTER SLOTS (a list, or redis-py's dict by range) as (start, end, host, port)."""
    rows: list[tuple[int, int, Any]] = []
    if isinstance(reply, dict):  # redis-py's parsed form: (start, end) -> {"primary": ...}
        rows = [(s, e, info["primary"]) for (s, e), info in reply.items()]
    else:
        rows = [(row[0], row[1], row[2]) for row in reply]
    ranges = []
    for start, end, primary in rows:
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        ranges.append((int(start), int(end), host or asked, int(primary[1])))
    return ranges


def _fields(item: Any) -> dict[str, Any]:
    """A CLUSTER SHARDS map: a dict (RESP3, newer redis-py) or a flat key/value list."""
    pairs = item.items() if isinstance(item, dict) else zip(item[::2], item[1::2], strict=True)
    return {key.decode() if isinstance(key, bytes) else str(key): value for key, value in pairs}


def _shard_primaries(reply: Any, asked: str) -> list[tuple[str, int]]:
    """The online primaries of a CLUSTER SHARDS reply as (host, port); an empty ``ip``
    (a node that does not know its own address) is the node asked."""
    found = []
    for shard in reply:
        for node in (_fields(n) for n in _fields(shard)["nodes"]):
            if as_str(node["role"]) != "master" or as_str(node["health"]) != "online":
                continue
            host = as_str(node.get("ip") or b"") or asked
            found.append((host, int(node.get("port") or node["tls-port"])))
    return found


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ClusterTarget:
    """What a cluster URL says: the seed nodes, the user and TLS."""

    seeds: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None
    tls_options: dict[str, str] = field(default_factory=dict)

    def node_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"username": self.username, "password": self.password}
        options.update(self.tls_options)
        if self.tls:
            options["ssl"] = True
        return options

    def topology(self) -> ClusterTopology:
        return ClusterTopology(self.seeds, self.node_options())

    def node_client(self, host: str, port: int, **options: Any) -> aioredis.Redis:
        """A client of one node (``options`` as for ``aioredis.Redis``), for per-node work."""
        return aioredis.Redis(host=host, port=port, **self.node_options(), **options)

    def slot_client(self, topology: ClusterTopology, key: str, **options: Any) -> aioredis.Redis:
        """A client of the primary serving ``key``'s slot (``options`` as for ``from_url``)."""
        node = self.node_options()
        connection_class = SlotSSLConnection if node.pop("ssl", False) else SlotConnection
        pool = ConnectionPool(
            connection_class=connection_class, topology=topology, slot=slot_of(key),
            **node, **options,
        )  # fmt: skip
        client = aioredis.Redis(connection_pool=pool)
        client.auto_close_connection_pool = True  # closing the client closes its pool
        return client


def parse_cluster_url(url: str, what: str = "--redis-url") -> ClusterTarget:
    """The target of a cluster URL; ConfigError (one line, password masked) when unusable."""
    shown = mask_url_password(url)

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{what} {shown!r}: {problem} (expected {_FORM})")

    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SCHEMES:
        raise bad("not a cluster URL")
    # Split by hand, not by urlsplit: the netloc holds several hosts, IPv6 ones in
    # brackets, which urlsplit judges differently from one Python release to the next
    # (3.11.2 refuses 'h1:7000,[::1]:7001,h3', 3.11.7 leaves it to us).
    rest, hash_sign, _ = rest.partition("#")
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if hash_sign or path.strip("/"):
        raise bad("a path or '#' part (a cluster has database 0 only)")
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    try:
        pairs = parse_qsl(query_text, keep_blank_values=True, strict_parsing=bool(query_text))
    except ValueError:
        raise bad("an unreadable query") from None
    query = dict(pairs)
    unknown = sorted(set(query) - set(TLS_OPTIONS))
    if unknown:
        raise bad(f"unknown option {unknown[0]!r} (known: {', '.join(TLS_OPTIONS)})")
    tls = SCHEMES[scheme.lower()]
    if query and not tls:
        raise bad(f"{', '.join(query)} without TLS (rediss+cluster://)")
    return ClusterTarget(
        seeds=tuple(_address(item, bad) for item in hosts.split(",")),
        tls=tls,
        username=unquote(user) or None,
        password=unquote(password) or None,
        tls_options=query,
    )


def _address(item: str, bad: Any) -> tuple[str, int]:
    """``host:port``, ``host`` (port 6379) or ``[v6]:port`` of one seed node."""
    host, port_text = item, str(DEFAULT_PORT)
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise bad(f"bad address {item!r}")
        port_text = rest[1:] or port_text
    elif ":" in item:
        host, _, port_text = item.rpartition(":")
    if not host:
        raise bad(f"no host in {item!r}" if item else "an empty node address")
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise bad(f"bad port in {item!r} (1 to 65535)")
    return host, int(port_text)

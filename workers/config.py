"""Configuration objects, one per role, filled from CLI flags and ``MAILPOOL_*`` variables.

Each option is a dataclass field whose metadata names its flag and help text.  The
environment variable is derived from the flag (``--max-size`` -> ``MAILPOOL_MAX_SIZE``), so
every option can be set from a Kubernetes ConfigMap.  Precedence: flag, then environment,
then the field default.  ``validate()`` runs at start and raises :class:`ConfigError` with one
line an operator can act on; the CLI turns it into exit status 2.

Secrets (passwords, and URLs that may carry one) are marked as such: each can also come from
an environment variable or a file (``--relay-password-file``: a mounted Kubernetes Secret),
never needs the command line, and is masked wherever it could be shown (:func:`describe`,
error messages, and through :func:`mask_secrets` every log line).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import math
import os
import re
import secrets
import socket
import ssl
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import dns.resolver
import redis.asyncio as aioredis

from workers import errors
from workers.codec.encode import idna_domain, is_utf8
from workers.codec.errors import BuildError
from workers.codec.signing import KeyTable, SigningKey, load_key, parse_key_table
from workers.relay import MaildirTransport, RelaySettings, Transport
from workers.relay.pool import SmtpPool
from workers.streams import cluster, layout, sentinel, suppression
from workers.streams.layout import StreamKeys

# The errors and the secret masking live in the lowest module (the streams layer raises
# them too); re-exported here, where the roles and the CLI have always found them.
MASK = errors.MASK
ConfigError = errors.ConfigError
Unavailable = errors.Unavailable
mask_secrets = errors.mask_secrets
mask_url_password = errors.mask_url_password
remember_secret = errors.remember_secret

ENV_PREFIX = "MAILPOOL_"

# What a secret option holds, which says how to mask it: the whole value, a URL whose
# password part is the secret, or comma-separated user:password pairs.
SecretKind = Literal["value", "url", "pairs"]
# A secret file holds one password; a bigger file is the wrong file (a key, a dump).
SECRET_FILE_LIMIT = 4096


MAX_SUPPRESS_TTL = 100 * 365 * 86400.0  # a century: longer would overflow dates


def check_suppress_ttl(ttl: float, name: str = "--suppress-ttl") -> None:
    if not 0 <= ttl <= MAX_SUPPRESS_TTL:  # also refuses NaN
        raise ConfigError(f"{name} must be 0..{MAX_SUPPRESS_TTL:.0f} seconds, got {ttl}")


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    repeatable: bool = False,
    sensitive: SecretKind | None = None,
    file_for: str | None = None,
) -> Any:
    """Declare a config field: its default, help text and (optionally) a custom flag name.

    A function as ``default`` is called for each config made (a value unique per worker, not
    one made at import and shared by every process forked after it).  ``sensitive`` marks a
    secret to mask (see :data:`SecretKind`); ``file_for`` makes the option a file holding the
    value of the named (secret) field, read at start.
    """
    metadata = {
        "help": help, "flag": flag, "repeatable": repeatable, "sensitive": sensitive,
        "file_for": file_for,
    }  # fmt: skip
    if repeatable:
        return field(default_factory=lambda: list(default), metadata=metadata)
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def check_utf8(config: Any) -> None:
    """Every text option is UTF-8.  A flag or MAILPOOL_* value with an octet that is not
    comes from argparse and os.environ as a lone surrogate, which failed later with a
    traceback: in Redis's client, in the SMTP greeting (ingest then greeted no one), or in
    the build of every message (delivery dead-lettered them all)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for text in value if isinstance(value, list | tuple) else [value]:
            if isinstance(text, str) and not is_utf8(text):
                raise ConfigError(f"{flag_name(f)}: not valid UTF-8 text")


def env_name(f: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + flag_name(f).lstrip("-").replace("-", "_").upper()


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:25`` for IPv6); raise ConfigError naming the option."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port_text)  # noqa: S104 - listen on all by default


def check_redis_url(url: str) -> None:
    if sentinel.is_sentinel_url(url):
        sentinel.parse_sentinel_url(url)  # ConfigError naming what is wrong
        return
    if cluster.is_cluster_url(url):
        cluster.parse_cluster_url(url)
        return
    shown = mask_url_password(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL": an unclosed [
        raise ConfigError(f"--redis-url: {exc} in {shown!r}") from None
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(
            "--redis-url: expected redis://, rediss://, unix://, redis+sentinel://, "
            f"rediss+sentinel://, redis+cluster:// or rediss+cluster://, got {shown!r}"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ConfigError(f"--redis-url: bad port in {shown!r} (1 to 65535)") from None
    try:  # the query's parameters, as the client reads them (nothing connects here)
        aioredis.ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--redis-url: cannot use {shown!r}: {_unknown(exc)}") from None


def _unknown(exc: Exception) -> str:
    """redis-py's words for a query parameter it does not take, said for an operator."""
    found = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
    return f"no parameter {found[1]!r}" if found else str(exc)


def _convert(value: str, target: Any, name: str) -> Any:
    """Turn an environment string into the field's type."""
    try:
        if target is bool or target == "bool":
            lowered = value.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(value)
        if value == "" and target in ("int | None", "float | None"):
            return None  # an empty variable: not given
        if target in (int, "int", "int | None"):
            return int(value)
        if target in (float, "float", "float | None"):
            number = float(value)
            if not math.isfinite(number):  # nan, inf: no bound, and nan passes every check
                raise ValueError(value)
            return number
    except ValueError:
        raise ConfigError(f"{name}: cannot read {value!r} as {target}") from None
    return value


@dataclass
class CommonConfig:
    """Options every command takes."""

    redis_url: str | None = option(
        None,
        "Redis URL (redis://[user@]host:port/db, rediss://, unix://, or Sentinel's "
        "redis+sentinel://[user@]host:port,host:port/MASTER-NAME[/db] and rediss+sentinel://; "
        "the password: --redis-password-file). Default: the pool's embedded redis-server when "
        "one is running, else redis://127.0.0.1:6379/0",
        sensitive="url",
    )
    redis_password: str | None = option(
        None,
        "password of the --redis-url user (replaces the URL's); keep it off the command line: "
        "environment or --redis-password-file",
        sensitive="value",
    )
    redis_password_file: str | None = option(
        None, "file holding the Redis password (e.g. a mounted Kubernetes Secret)",
        file_for="redis_password",
    )  # fmt: skip
    sentinel_password: str | None = option(
        None,
        "password of the Sentinels of a redis+sentinel:// --redis-url (their default user; "
        "the URL's password is the Redis servers'); keep it off the command line: environment "
        "or --sentinel-password-file",
        sensitive="value",
    )
    sentinel_password_file: str | None = option(
        None, "file holding the Sentinels' password", file_for="sentinel_password"
    )
    partitions: int = option(
        1,
        "streams split into this many partitions (keys tagged {0}..{N-1}, schema/README.md); "
        "on a Redis Cluster (redis+cluster://h1:p1,h2:p2) the keys are tagged even for 1",
    )
    key_prefix: str = option(layout.DEFAULT_PREFIX, "prefix of mailpool's internal Redis keys")
    receive_stream: str = option(layout.DEFAULT_RECEIVE, "stream of received messages")
    send_stream: str = option(layout.DEFAULT_SEND, "stream of messages to send")
    dead_stream: str = option(layout.DEFAULT_DEAD, "stream of dead letters")
    events_stream: str = option(layout.DEFAULT_EVENTS, "stream of delivery outcomes")
    log_format: str = option("auto", "log format: json, console, or auto (console on a terminal)")
    log_level: str = option("info", "log level: debug, info, warning, error")

    _choices: ClassVar[dict[str, set[str]]] = {
        "log_format": {"auto", "json", "console"},
        "log_level": {"debug", "info", "warning", "error"},
    }

    def validate(self) -> None:
        check_utf8(self)
        read_secret_files(self)
        remember_secrets(self)
        for name, allowed in self._choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: {value!r} is not one of {sorted(allowed)}"
                )
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        if self.redis_password:
            if not self.redis_url:
                raise ConfigError(
                    "--redis-password needs --redis-url: the URL says which server and user"
                )
            self.redis_url = url_with_password(self.redis_url, self.redis_password)
        if self.sentinel_password:
            if not (self.redis_url and sentinel.is_sentinel_url(self.redis_url)):
                raise ConfigError(
                    "--sentinel-password needs a Sentinel --redis-url (redis+sentinel://...)"
                )
            self.redis_url = url_with_query(
                self.redis_url, sentinel.PASSWORD_PARAMETER, self.sentinel_password
            )
        streams = ("receive_stream", "send_stream", "dead_stream", "events_stream")
        named: dict[str, str] = {}
        for name in streams:
            value = getattr(self, name)
            if not value:
                raise ConfigError(f"--{name.replace('_', '-')} must not be empty")
            # One stream for two roles feeds a worker its own output (dead letters or
            # events read as sends, dead-lettered again): thousands of entries a second.
            if value in named:
                raise ConfigError(
                    f"--{name.replace('_', '-')} and --{named[value].replace('_', '-')} "
                    f"name the same stream {value!r}: give each its own"
                )
            named[value] = name
        self._validate_partitions()

    def _validate_partitions(self) -> None:
        positive("partitions", self.partitions)
        if not self.partitioned:
            return
        for name in ("receive_stream", "send_stream", "dead_stream", "events_stream", "key_prefix"):
            if any(c in getattr(self, name) for c in layout.TAG_CHARACTERS):
                raise ConfigError(
                    f"--{name.replace('_', '-')}: no '{{' or '}}' in names of partitioned "
                    "streams (the partition's hash tag is the only one)"
                )

    @property
    def partitioned(self) -> bool:
        return self.partitions > 1 or cluster.is_cluster_url(self.redis_url)

    def partition_keys(self) -> tuple[StreamKeys, ...]:
        """The keys of every partition (the contract's names alone when not partitioned)."""
        return layout.partitions(self.stream_keys(), self.partitions, tagged=self.partitioned)

    def stream_keys(self) -> StreamKeys:
        """The Redis keys these options name (the layout owns how they are derived)."""
        return StreamKeys(
            receive=self.receive_stream,
            send=self.send_stream,
            dead=self.dead_stream,
            events=self.events_stream,
            prefix=self.key_prefix,
        )


def default_consumer_name() -> str:
    """A consumer name no other worker has: host name (the pod name) and pid, for people
    reading ``XINFO CONSUMERS``, plus a random suffix, because the two together are not
    unique: containers on the host network share the host's name and each runs as pid 1.

    Made once per worker (config or listener) and kept for its life.  A restarted worker is
    a new consumer: what its predecessor left pending is claimed after ``--claim-after``,
    but for what a stop released (read and never started: claimed at once); give
    ``--consumer`` a stable, unique name to have it resume its own at once.
    """
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


C = TypeVar("C", bound=CommonConfig)


def add_arguments(parser: argparse.ArgumentParser, config_class: type[CommonConfig]) -> None:
    """Add one flag per config field; defaults are left to :func:`from_arguments`."""
    for f in dataclasses.fields(config_class):
        if f.name.startswith("_"):
            continue
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f)}]"
        if f.metadata.get("repeatable"):
            parser.add_argument(flag_name(f), dest=f.name, action="append", help=help_text)
        elif f.type in (bool, "bool"):
            parser.add_argument(
                flag_name(f), dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(flag_name(f), dest=f.name, help=help_text)


def from_arguments(
    config_class: type[C],
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Build and validate a config: flag, else environment variable, else default."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        given = getattr(args, f.name, None)
        if given is None and env_name(f) in env:
            raw = env[env_name(f)]
            given = _split_list(raw) if f.metadata.get("repeatable") else raw
        if given is None:
            continue
        if f.metadata.get("repeatable"):
            values[f.name] = list(given)
        elif isinstance(given, str):
            values[f.name] = _convert(given, f.type, flag_name(f))
        else:
            values[f.name] = given
    config = config_class(**values)
    config.validate()
    return config


def _split_list(raw: str) -> list[str]:
    """Environment lists are comma or whitespace separated."""
    return [item for item in raw.replace(",", " ").split() if item]


def describe(config: CommonConfig) -> dict[str, Any]:
    """The config as a dict for the start-up log line, with secrets masked."""
    shown: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = f.metadata.get("sensitive")
        if kind == "url" and value:
            value = mask_url_password(value)
        elif kind and value:
            value = MASK
        shown[f.name] = value
    return shown


def url_with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (percent-encoded) as its password, the user kept."""
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    netloc = f"{user}:{quote(password, safe='')}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


def url_with_query(url: str, name: str, value: str) -> str:
    """``url`` with the query parameter ``name`` set to ``value`` (percent-encoded)."""
    parts = urlsplit(url)
    kept = [item for item in parts.query.split("&") if item and item.split("=")[0] != name]
    query = "&".join([*kept, f"{name}={quote(value, safe='')}"])
    return urlunsplit(parts._replace(query=query))


# --- secrets -------------------------------------------------------------------------------
def secret_values(config: CommonConfig) -> Iterator[str]:
    """Every secret the config holds: password options, URL passwords, AUTH passwords."""
    for f in dataclasses.fields(config):
        kind, value = f.metadata.get("sensitive"), getattr(config, f.name)
        if not kind or not isinstance(value, str) or not value:
            continue
        if kind == "value":
            yield value
        elif kind == "url":
            yield from _url_passwords(value)
        else:  # pairs: user:password,user:password
            yield from (p.partition(":")[2] for p in value.split(",") if ":" in p)


def _url_passwords(url: str) -> Iterator[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    if parts.password:
        yield parts.password
    for name, _, value in (item.partition("=") for item in parts.query.split("&")):
        if name.lower() in {"password", "passwd", sentinel.PASSWORD_PARAMETER} and value:
            yield value


def remember_secrets(config: CommonConfig) -> None:
    for value in secret_values(config):
        remember_secret(value)


def read_secret_files(config: CommonConfig) -> None:
    """Fill each secret from its ``--*-file`` option; one line (exit 2) when it cannot."""
    for f in dataclasses.fields(config):
        target, path = f.metadata.get("file_for"), getattr(config, f.name)
        if not target or not path:
            continue
        content = read_secret_file(path, flag_name(f))
        current = getattr(config, target)
        if current and current != content:
            raise ConfigError(f"--{target.replace('_', '-')} and {flag_name(f)}: give one of them")
        setattr(config, target, content)


def regular_file(path: str | Path, what: str) -> None:
    """ConfigError unless ``path`` is a regular file (or missing: its reader says so).  A
    FIFO given as a file blocked the start for ever, and /dev/zero never ended."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what}: not a regular file")


def read_secret_file(path: str, flag: str) -> str:
    """The one-line secret in ``path``, without the line end ``echo`` and editors add."""
    regular_file(path, f"{flag} {path}")
    try:
        with open(path, "rb") as handle:
            data = handle.read(SECRET_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None
    if len(data) > SECRET_FILE_LIMIT:
        raise ConfigError(f"{flag} {path}: over {SECRET_FILE_LIMIT} bytes, not a password file")
    try:
        text = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{flag} {path}: the file is empty")
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{flag} {path}: more than one line, expected the password alone")
    remember_secret(text)
    return text


def positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    # NaN compares false with everything: "not >= 0" catches it where "< 0" did not.
    if not value >= 0 or (value == 0 and not allow_zero) or not math.isfinite(value):
        raise ConfigError(
            f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}"
        )


NO_SYSTEM_RESOLVER = (
    "no system DNS resolver (/etc/resolv.conf) for verification: give --dns-server HOST:PORT, "
    "or --no-verify"
)


def _system_resolver_configured() -> bool:
    try:
        dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration:
        return False
    return True


# An authserv-id as we write it: a plain token, a host name usually (RFC 8601 section 2.5).
_AUTHSERV_ID = re.compile(r"[A-Za-z0-9._-]{1,253}")


@dataclass
class IngestConfig(CommonConfig):
    """``mailpool ingest``: the SMTP server role."""

    listen: str = option("0.0.0.0:2525", "SMTP listen address HOST:PORT")
    hostname: str = option(
        socket.gethostname(),
        "name in the SMTP banner, EHLO reply and Received field (ASCII: an international "
        "name as its xn-- A-labels; checked at start)",
    )
    max_size: int = option(26_214_400, "largest message accepted, in octets (SIZE; 552 beyond)")
    max_recipients: int = option(100, "recipients per message (452 beyond; RFC 5321 asks >= 100)")
    accept_domain: list[str] = option(
        [],
        "accepted recipient domain, repeatable (550 otherwise); none = accept all",
        repeatable=True,
    )
    tls_cert: str | None = option(None, "PEM certificate for STARTTLS (and --tls-listen)")
    tls_key: str | None = option(None, "PEM private key for the certificate")
    tls_listen: str | None = option(
        None, "optional implicit-TLS listen address HOST:PORT (e.g. :465)"
    )
    require_tls: bool = option(False, "refuse MAIL before STARTTLS (530)")
    auth_file: str | None = option(
        None, "file of 'user:password' lines enabling AUTH PLAIN/LOGIN (after TLS only)"
    )
    auth_users: str | None = option(
        None,
        "comma-separated user:password pairs enabling AUTH (prefer --auth-file)",
        sensitive="pairs",
    )
    auth_required: bool = option(False, "refuse MAIL from unauthenticated sessions (530)")
    max_connections: int = option(1000, "concurrent SMTP connections per worker (421 beyond)")
    max_connections_per_ip: int = option(
        0,
        "concurrent SMTP connections per worker from one client address, an IPv6 one counted "
        "by its /64 (421 beyond); 0: a tenth of --max-connections, at least 10",
    )
    memory_budget: int = option(
        0,
        "octets of message data a worker holds at once (452 4.3.1 beyond); 0: a quarter of "
        "--memory-limit, else 256 MiB; never below --max-size",
    )
    memory_limit: int = option(
        0,
        "the worker's memory limit in octets, for the --memory-budget default (the deploy "
        "gives the container's); 0: the cgroup's limit, if there is one",
    )
    connection_timeout: float = option(
        600.0, "longest SMTP session, seconds (a bound on slow senders; RFC 5321 sets none)"
    )
    command_timeout: float = option(
        300.0, "longest wait for one command or DATA line, seconds (RFC 5321: at least 5 min)"
    )
    min_replicas: int = option(0, "wait for WAIT N replica acks before 250 (451 on timeout)")
    replica_timeout: float = option(1.0, "seconds to wait for --min-replicas acks")
    store_timeout: float = option(
        30.0,
        "seconds a message waits for Redis to store it before 451, plus 1 s per 8 MiB queued",
    )
    keep_raw: str = option("defects", "store raw bytes in entries: never, defects, always")
    verify: bool = option(
        True,
        "check SPF, DKIM, DMARC and ARC of received mail: verdicts in the entry's auth key "
        "and an Authentication-Results field (--no-verify: neither)",
    )
    dns_server: str | None = option(
        None, "DNS resolver HOST:PORT verification asks (a name looked up once, at start); "
        "default the system's (/etc/resolv.conf)",
    )  # fmt: skip
    authserv_id: str | None = option(
        None, "the name in our Authentication-Results field (RFC 8601); default --hostname"
    )
    verify_budget: float = option(
        3.0, "seconds verification may take per message, from MAIL FROM and from the end of "
        "DATA (what is not known by then is temperror; never a refusal)",
    )  # fmt: skip
    shutdown_grace: float = option(30.0, "seconds sessions may finish after SIGTERM")
    http: str | None = option(None, "serve /metrics, /healthz, /readyz on HOST:PORT")

    def validate(self) -> None:
        super().validate()
        if not (self.hostname.isascii() and self.hostname.isprintable()) or " " in self.hostname:
            # The greeting and the EHLO reply carry it: aiosmtpd sends them as ASCII.
            raise ConfigError(
                f"--hostname: {self.hostname!r} is no ASCII host name (write an international "
                "one as its xn-- A-labels)"
            )
        parse_host_port(self.listen, "--listen")
        if self.tls_listen:
            parse_host_port(self.tls_listen, "--tls-listen")
        if self.http:
            parse_host_port(self.http, "--http")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        for path in (self.tls_cert, self.tls_key, self.auth_file):
            if path and not os.path.isfile(path):
                raise ConfigError(f"file not found: {path}")
        if (self.tls_listen or self.require_tls) and not self.tls_cert:
            raise ConfigError("--tls-listen and --require-tls need --tls-cert and --tls-key")
        if (self.auth_file or self.auth_users) and not self.tls_cert:
            raise ConfigError("AUTH is only offered after TLS: give --tls-cert and --tls-key")
        if self.max_recipients < 100:
            raise ConfigError("--max-recipients must be at least 100 (RFC 5321 section 4.5.3.1.8)")
        if self.keep_raw not in {"never", "defects", "always"}:
            raise ConfigError(f"--keep-raw: {self.keep_raw!r} is not never, defects or always")
        self._validate_verification()
        for name in (
            "max_size",
            "max_connections",
            "connection_timeout",
            "command_timeout",
            "replica_timeout",
        ):
            positive(name, getattr(self, name))
        positive("min_replicas", self.min_replicas, allow_zero=True)
        positive("shutdown_grace", self.shutdown_grace, allow_zero=True)
        positive("store_timeout", self.store_timeout)
        self._derive_load_limits()

    def _validate_verification(self) -> None:
        if self.dns_server is not None:
            self.dns_address  # noqa: B018 - resolves the name, ConfigError if it cannot
        elif self.verify and not _system_resolver_configured():
            raise ConfigError(NO_SYSTEM_RESOLVER)
        if not 0 < self.verify_budget <= 60:
            raise ConfigError("--verify-budget: seconds, more than 0 and at most 60")
        if self.verify and not _AUTHSERV_ID.fullmatch(self.our_authserv_id):
            raise ConfigError(
                f"--authserv-id: {self.our_authserv_id!r} is not a name of letters, digits, "
                "dots, hyphens and underscores (the default is --hostname)"
            )

    @functools.cached_property
    def dns_address(self) -> tuple[str, int] | None:
        """--dns-server as (IP, port): a host name is looked up once, at start (dnspython
        asks servers by address)."""
        if self.dns_server is None:
            return None
        host, port = parse_host_port(self.dns_server, "--dns-server")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                host = str(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0])
            except (OSError, UnicodeError) as exc:
                raise ConfigError(f"--dns-server: cannot look up {host!r}: {exc}") from None
        return host, port

    @property
    def our_authserv_id(self) -> str:
        """--authserv-id, else --hostname."""
        return self.authserv_id or self.hostname

    def _derive_load_limits(self) -> None:
        """--max-connections-per-ip and --memory-budget 0 (the defaults) are derived."""
        for name in ("max_connections_per_ip", "memory_budget", "memory_limit"):
            positive(name, getattr(self, name), allow_zero=True)
        if not self.max_connections_per_ip:
            share = max(MIN_CONNECTIONS_PER_IP, self.max_connections // 10)
            self.max_connections_per_ip = min(self.max_connections, share)
        if not self.memory_budget:
            limit = self.memory_limit or cgroup_memory_limit()
            budget = limit // MEMORY_BUDGET_SHARE if limit else DEFAULT_MEMORY_BUDGET
            self.memory_budget = max(budget, self.max_size)
        elif self.memory_budget < self.max_size:
            raise ConfigError(
                f"--memory-budget {self.memory_budget} is below --max-size {self.max_size}: "
                "a message of the largest size accepted could never be held"
            )


# The smallest derived --max-connections-per-ip: a relay opens a few connections at once.
MIN_CONNECTIONS_PER_IP = 10
# Without a known memory limit, the ingest memory budget; with one, this share of it (a
# message in flight costs about twice its size at its peak, plus the worker's own ~60 MB).
DEFAULT_MEMORY_BUDGET = 256 << 20
MEMORY_BUDGET_SHARE = 4
CGROUP_MEMORY_LIMITS = (
    "/sys/fs/cgroup/memory.max",  # cgroup v2
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
)


def cgroup_memory_limit(paths: tuple[str, ...] = CGROUP_MEMORY_LIMITS) -> int | None:
    """The memory limit of this process's container (its cgroup), None without one."""
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a page-rounded 2**63 (v1) mean no limit.
        if text.isdigit() and int(text) < 1 << 62:
            return int(text)
        return None
    return None


def maildir_path(relay: str) -> str:
    """The directory of a ``maildir:PATH`` (or ``maildir://PATH``) relay."""
    return relay.removeprefix("maildir:").removeprefix("//")


def check_relay(relay: str) -> None:
    """Refuse at start what the transport could never use (one line, exit status 2)."""
    scheme, colon, _ = relay.partition(":")
    if scheme == "maildir" and colon:
        _check_maildir(maildir_path(relay))
    elif scheme == "maildir":
        raise ConfigError("--relay: maildir needs a path: maildir:PATH")
    elif scheme in {"smtp", "smtps"}:
        _check_smtp_relay(relay)
    else:
        raise ConfigError(f"--relay: unknown scheme {scheme!r} (smtp, smtps or maildir)")


def _check_smtp_relay(relay: str) -> None:
    shown = mask_url_password(relay)
    try:
        url = urlsplit(relay)
    except ValueError as exc:  # "Invalid IPv6 URL": an unclosed [
        raise ConfigError(f"--relay: {exc} in {shown!r}") from None
    if not url.hostname:
        raise ConfigError(f"--relay: no host in {shown!r} (smtp://host:port)")
    try:
        port = url.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port <= 65535:
        raise ConfigError(f"--relay: bad port in {shown!r} (1 to 65535)")


def _check_maildir(path: str) -> None:
    """The transport creates the maildir itself (tmp, new, cur) and nothing above it, so
    that a mistyped path fails here instead of growing a directory tree somewhere."""
    if not path:
        raise ConfigError("--relay: maildir needs a path: maildir:PATH")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--relay maildir:{root}: not a directory")
    if not root.exists() and not root.parent.is_dir():
        raise ConfigError(
            f"--relay maildir:{root}: its parent directory does not exist ({root.parent}); "
            "create it or correct the path"
        )


def _check_ca_file(path: str, *, verify: bool) -> None:
    """Loaded once here so that a missing, unreadable or non-PEM file stops the start."""
    if not verify:
        raise ConfigError("--tls-ca-file and --no-tls-verify contradict each other: give one")
    regular_file(path, f"--tls-ca-file {path}")
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"--tls-ca-file {path}: {reason}") from None


KEY_FILE_LIMIT = 65_536  # a PEM private key is a few KB; a larger file is the wrong one
KEY_TABLE_LIMIT = 1 << 20  # a line a key: thousands of domains fit


def load_key_table(path: str) -> KeyTable:
    """The --dkim-keys table with every key loaded; ConfigError names the line and the key
    file (never the key).  A key's relative path is relative to the table's directory."""
    where = f"--dkim-keys {path}"
    regular_file(path, where)
    try:
        if os.path.getsize(path) > KEY_TABLE_LIMIT:
            raise ValueError(f"over {KEY_TABLE_LIMIT} bytes, not a key table")
        text = Path(path).read_text(encoding="utf-8")
        lines = parse_key_table(text)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc
        raise ConfigError(f"{where}: {reason}") from None
    if not lines:
        raise ConfigError(f"{where}: no keys (expected DOMAIN SELECTOR PATH-TO-PEM lines)")
    keys = []
    for line in lines:
        key_path = Path(path).parent / line.path
        regular_file(key_path, f"{where} line {line.number}: {key_path}")
        try:
            with open(key_path, "rb") as handle:
                pem = handle.read(KEY_FILE_LIMIT + 1)
            if len(pem) > KEY_FILE_LIMIT:
                raise ValueError(f"over {KEY_FILE_LIMIT} bytes, not a PEM private key")
            private_key = load_key(pem)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ConfigError(f"{where} line {line.number}: {key_path}: {why}") from None
        except ValueError as exc:
            raise ConfigError(f"{where} line {line.number}: {key_path}: {exc}") from None
        source = f"{path}:{line.number}"
        keys.append(SigningKey(line.domain, line.selector, private_key, source))
    return KeyTable(keys)


# --starttls: whether a smtp:// relay's connection must (True), may (None: when offered) or
# must not (False) be encrypted; "opportunistic" also skips the certificate check.
STARTTLS_MODES: dict[str, bool | None] = {
    "auto": None, "require": True, "opportunistic": None, "off": False,
}  # fmt: skip

# Seconds the derived --claim-after adds to the longest hold of an entry: the settlement's
# round trip, and a worker slowed by load.
CLAIM_MARGIN = 60.0


@dataclass
class DeliveryConfig(CommonConfig):
    """``mailpool deliver``: the delivery role."""

    relay: str | None = option(
        None,
        "smtp://[user@]host:port, smtps://..., or maildir:PATH (the password: "
        "--relay-password-file)",
        sensitive="url",
    )
    relay_user: str | None = option(None, "SMTP AUTH user (overrides the URL's)")
    relay_password: str | None = option(
        None,
        "SMTP AUTH password (overrides the URL's); keep it off the command line: "
        "environment or --relay-password-file",
        sensitive="value",
    )
    relay_password_file: str | None = option(
        None, "file holding the SMTP AUTH password (e.g. a mounted Kubernetes Secret)",
        file_for="relay_password",
    )  # fmt: skip
    starttls: str = option(
        "auto",
        "STARTTLS on smtp:// relays: auto (when offered; required with --tls-ca-file), "
        "require, opportunistic (when offered, the certificate not verified: Postfix's `may`), "
        "off (the only mode that sends relay credentials in clear)",
    )
    tls_verify: bool = option(True, "verify the relay's TLS certificate")
    tls_ca_file: str | None = option(
        None,
        "PEM file of the CA certificates to verify the relay with, instead of the system's "
        "(TLS required)",
    )
    group: str = option("delivery", "consumer group on the send stream")
    consumer: str = option(default_consumer_name, "consumer name in the group (unique per worker)")
    concurrency: int = option(
        10,
        "pooled SMTP connections per worker (a send in flight on each, one more behind it "
        "when the relay offers PIPELINING)",
    )
    batch: int = option(
        100, "most entries read per XREADGROUP (a worker holds at most 2 x --concurrency)"
    )
    messages_per_connection: int = option(100, "replace a pooled SMTP connection after this many")
    idle_close: float = option(30.0, "close pooled SMTP connections idle this long, seconds")
    smtp_timeout: float = option(
        300.0,
        "wait for each relay reply before the final dot (greeting, EHLO, MAIL, each RCPT, DATA) "
        "and for all of them and the message's transfer together, seconds (RFC 5321: 5 min)",
    )
    smtp_data_timeout: float = option(
        600.0,
        "wait for the relay's reply to the final dot, seconds (RFC 5321: 10 min; a relay "
        "answering later gets the message again)",
    )
    claim_after: float = option(
        0.0,
        "claim entries pending this long on a silent consumer, seconds; 0: 2 x (--smtp-timeout "
        "+ --smtp-data-timeout) + 60, and a value given must exceed 2 x that sum",
    )
    max_deliveries: int = option(5, "read this many times with no outcome = poison dead letter")
    retry_base: float = option(60.0, "first retry delay, seconds (doubles, with jitter)")
    retry_cap: float = option(3600.0, "longest retry delay, seconds")
    max_attempts: int = option(60, "attempts before a dead letter")
    max_age: float = option(172_800.0, "seconds since the first attempt before a dead letter")
    events_maxlen: int = option(100_000, "approximate cap of the events stream")
    sent_ttl: float = option(
        float(layout.DEFAULT_SENT_TTL), "how long idempotency records are kept, seconds"
    )
    suppress_ttl: float = option(
        float(suppression.DEFAULT_TTL),
        "seconds a recipient a relay refused as an address (5.1.x, 5.2.1) stays suppressed "
        "(not attempted); 0 turns the suppression list off (no look-up, no additions)",
    )
    min_replicas: int = option(
        0,
        "WAIT N replica acks after each batch of settlements; unconfirmed ones are run again "
        "until confirmed (a stopped worker leaves the entry pending)",
    )
    replica_timeout: float = option(1.0, "seconds to wait for --min-replicas acks")
    shutdown_grace: float = option(30.0, "seconds sends in flight may finish after SIGTERM")
    hostname: str = option(
        socket.gethostname(),
        "EHLO name and Message-ID domain (an international name goes out as its A-labels; "
        "one IDNA refuses stops the start)",
    )
    dkim_keys: str | None = option(
        None,
        "DKIM key table: a DOMAIN SELECTOR PATH-TO-PEM line per key (ed25519 or rsa, "
        "unencrypted), '#' comments; a message is signed with the keys of its From domain "
        "(or of its nearest parent in the table, else of a '*' line); README.md 'DKIM signing'",
    )
    http: str | None = option(None, "serve /metrics, /healthz, /readyz on HOST:PORT")

    @functools.cached_property
    def signing_keys(self) -> KeyTable | None:
        """The --dkim-keys table, loaded (at start: ``validate``); None when not given."""
        return load_key_table(self.dkim_keys) if self.dkim_keys else None

    def validate(self) -> None:
        super().validate()
        try:  # as the build of every message takes it (else each one is dead-lettered)
            idna_domain(self.hostname, "--hostname")
        except BuildError as exc:
            raise ConfigError(str(exc)) from None
        _ = self.signing_keys  # a missing, unreadable or malformed key stops the start
        if self.relay is None:
            raise ConfigError(
                "--relay is required (smtp://host:port, smtps://host:port or maildir:PATH)"
            )
        check_relay(self.relay)
        if self.tls_ca_file:  # an empty MAILPOOL_TLS_CA_FILE means none
            _check_ca_file(self.tls_ca_file, verify=self.tls_verify)
        self._check_starttls()
        if self.http:
            parse_host_port(self.http, "--http")
        for name in (
            "concurrency",
            "batch",
            "messages_per_connection",
            "idle_close",
            "smtp_timeout",
            "smtp_data_timeout",
            "max_deliveries",
            "retry_base",
            "retry_cap",
            "max_attempts",
            "max_age",
            "events_maxlen",
            "sent_ttl",
            "replica_timeout",
        ):
            positive(name, getattr(self, name))
        positive("min_replicas", self.min_replicas, allow_zero=True)
        positive("shutdown_grace", self.shutdown_grace, allow_zero=True)
        check_suppress_ttl(self.suppress_ttl)
        if self.retry_cap < self.retry_base:
            raise ConfigError("--retry-cap must be >= --retry-base")
        self._derive_claim_after()

    def _check_starttls(self) -> None:
        if self.starttls not in STARTTLS_MODES:
            raise ConfigError(
                f"--starttls: {self.starttls!r} is not auto, require, opportunistic or off"
            )
        if self.starttls == "off" and self.tls_ca_file and not self._implicit_tls():
            raise ConfigError(
                "--tls-ca-file verifies the relay's TLS certificate, and --starttls off sends "
                "in clear: leave out one of them"
            )
        if self.starttls != "opportunistic":
            return
        if self._implicit_tls():
            raise ConfigError(
                "--starttls opportunistic is for smtp:// relays (smtps:// always encrypts; "
                "--no-tls-verify leaves its certificate unchecked)"
            )
        if self.tls_ca_file:
            raise ConfigError(
                "--starttls opportunistic does not verify the relay's certificate: "
                "leave out --tls-ca-file, or use --starttls auto or require"
            )

    def _implicit_tls(self) -> bool:
        return (self.relay or "").startswith("smtps:")

    def longest_hold(self) -> float:
        """The longest a live worker holds an entry before settling it, seconds: a send takes
        at most --smtp-timeout before the final dot and --smtp-data-timeout after it, and an
        entry read may wait for one send on its connection before its own starts (behind
        that one's dot, when transactions are chained: workers.relay.pool)."""
        return 2 * self.longest_send()

    def longest_send(self) -> float:
        """The longest one send takes, seconds: --smtp-timeout before the final dot and
        --smtp-data-timeout after it."""
        return self.smtp_timeout + self.smtp_data_timeout

    def relay_settings(self) -> RelaySettings:
        """The SMTP relay's settings (of a validated config: ``check_relay`` made sure of
        the host and port)."""
        url = urlsplit(self.relay or "")
        implicit_tls = url.scheme == "smtps"
        starttls = STARTTLS_MODES[self.starttls]
        if self.tls_ca_file:  # a relay whose certificate is to be checked must have TLS
            starttls = True
        return RelaySettings(
            host=url.hostname or "",
            port=url.port or (465 if implicit_tls else 25),
            implicit_tls=implicit_tls,
            starttls=False if implicit_tls else starttls,
            verify=self.tls_verify and self.starttls != "opportunistic",
            ca_file=self.tls_ca_file,
            username=self.relay_user or (unquote(url.username) if url.username else None),
            password=self.relay_password or (unquote(url.password) if url.password else None),
            local_hostname=self.hostname,
            timeout=self.smtp_timeout,
            data_timeout=self.smtp_data_timeout,
        )

    def open_transport(self) -> Transport:
        """The relay's transport: a maildir, or a pool of SMTP connections to the relay."""
        relay = self.relay or ""
        if relay.startswith("maildir:"):
            path = maildir_path(relay)
            try:  # the maildir itself only: its parent must exist (checked at start)
                return MaildirTransport(path)
            except OSError as exc:
                raise ConfigError(f"--relay maildir:{path}: {exc.strerror or exc}") from None
        return SmtpPool(
            self.relay_settings(),
            size=self.concurrency,
            messages_per_connection=self.messages_per_connection,
            idle_close=self.idle_close,
        )

    def _derive_claim_after(self) -> None:
        """--claim-after 0 (the default) is derived; a value given must exceed the longest
        hold, or a live worker's entry would be claimed and sent twice."""
        positive("claim_after", self.claim_after, allow_zero=True)
        if self.claim_after == 0:
            self.claim_after = self.longest_hold() + CLAIM_MARGIN
        elif self.claim_after <= self.longest_hold():
            raise ConfigError(
                f"--claim-after {self.claim_after:g} must exceed 2 x (--smtp-timeout "
                f"{self.smtp_timeout:g} + --smtp-data-timeout {self.smtp_data_timeout:g}) = "
                f"{self.longest_hold():g} s, the longest a live worker holds an entry "
                "(or give 0: derived from them)"
            )

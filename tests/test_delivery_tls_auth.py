"""Relay security: STARTTLS (auto / require / opportunistic / off), implicit TLS
(smtps://), a relay whose certificate a private CA signed (--tls-ca-file) and AUTH with
credentials from the URL or from --relay-user/--relay-password."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.delivery_util import (
    enqueue,
    events,
    make_config,
    run_until_settled,
    running_worker,
    send_message,
)
from tests.harness import wait_until
from tests.ingest_util import make_certificate
from tests.sinks import RecordingSink
from workers.config import ConfigError

# A password no other test's text holds: the worker remembers it and masks it in every
# log line of this process (workers.errors.mask_secrets), "secret" in "/run/secrets" too.
PASSWORD = "pw-4d7c1a"


@pytest.fixture
def tls_sink(
    make_sink: Callable[..., RecordingSink], certificate: tuple[Path, Path]
) -> RecordingSink:
    return make_sink(certificate=certificate, users={"mailer": "p@ss:w/rd"})


async def test_starttls_when_offered_and_auth_from_the_url(
    redis: aioredis.Redis, redis_url: str, tls_sink: RecordingSink
) -> None:
    await enqueue(redis, send_message(["ann@example.com"]))
    relay = f"smtp://mailer:p%40ss%3Aw%2Frd@127.0.0.1:{tls_sink.port}"
    await run_until_settled(redis, make_config(redis_url, relay, tls_verify=False))
    [got] = tls_sink.received
    assert got.tls and got.login == "mailer"


async def test_credentials_from_options_override_the_url(
    redis: aioredis.Redis, redis_url: str, tls_sink: RecordingSink
) -> None:
    await enqueue(redis, send_message(["ann@example.com"]))
    relay = f"smtp://someone:wrong@127.0.0.1:{tls_sink.port}"
    config = make_config(
        redis_url, relay, tls_verify=False, relay_user="mailer", relay_password="p@ss:w/rd"
    )
    await run_until_settled(redis, config)
    assert [r.login for r in tls_sink.received] == ["mailer"]


async def test_wrong_password_defers_instead_of_dead_lettering(
    redis: aioredis.Redis, redis_url: str, tls_sink: RecordingSink
) -> None:
    await enqueue(redis, send_message(["ann@example.com"]))
    relay = f"smtp://mailer:nope@127.0.0.1:{tls_sink.port}"
    async with running_worker(make_config(redis_url, relay, tls_verify=False)):
        await wait_until(lambda: _has_deferred(redis))
    assert tls_sink.received == []
    assert await redis.xlen("email.send.dead") == 0
    # aiosmtpd answers a failed AUTH slowly (past --smtp-timeout 0.5): a timeout or 535,
    # either way the mail waits for a fixed configuration instead of dying.


async def test_starttls_required_but_not_offered_sends_nothing_in_clear(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    await enqueue(redis, send_message(["ann@example.com"]))
    async with running_worker(make_config(redis_url, sink.url, starttls="require")):
        await wait_until(lambda: _has_deferred(redis))
    assert sink.received == []


async def test_starttls_off_sends_in_clear_even_when_offered(
    redis: aioredis.Redis,
    redis_url: str,
    make_sink: Callable[..., RecordingSink],
    certificate: tuple[Path, Path],
) -> None:
    sink = make_sink(certificate=certificate)
    await enqueue(redis, send_message(["ann@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url, starttls="off"))
    assert [r.tls for r in sink.received] == [False]


async def test_smtps_implicit_tls(
    redis: aioredis.Redis,
    redis_url: str,
    make_sink: Callable[..., RecordingSink],
    certificate: tuple[Path, Path],
) -> None:
    sink = make_sink(certificate=certificate, implicit_tls=True)
    await enqueue(redis, send_message(["ann@example.com"]))
    relay = f"smtps://127.0.0.1:{sink.port}"
    await run_until_settled(redis, make_config(redis_url, relay, tls_verify=False))
    assert [r.tls for r in sink.received] == [True]


async def test_certificate_verification_is_on_by_default(
    redis: aioredis.Redis, redis_url: str, tls_sink: RecordingSink
) -> None:
    """A relay with a certificate nobody signed is not trusted unless told so."""
    await enqueue(redis, send_message(["ann@example.com"]))
    relay = f"smtp://mailer:p%40ss%3Aw%2Frd@127.0.0.1:{tls_sink.port}"
    async with running_worker(make_config(redis_url, relay)):
        await wait_until(lambda: _has_deferred(redis))
    assert tls_sink.received == []


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "smtps"])
async def test_relay_signed_by_a_private_ca_is_trusted_with_tls_ca_file(
    redis: aioredis.Redis,
    redis_url: str,
    make_sink: Callable[..., RecordingSink],
    tmp_path: Path,
    implicit_tls: bool,
) -> None:
    """Not trusted by the system's CAs (deferred, nothing sent); trusted, and verified with
    its host name, once the worker is given the CA's certificate."""
    private_ca = make_certificate(tmp_path / "ca", ca=True)
    relay_certificate = make_certificate(tmp_path / "relay", issuer=private_ca)
    sink = make_sink(certificate=relay_certificate, implicit_tls=implicit_tls)
    relay = f"smtps://127.0.0.1:{sink.port}" if implicit_tls else sink.url
    await enqueue(redis, send_message(["ann@example.com"]))
    async with running_worker(make_config(redis_url, relay, starttls="require")):
        await wait_until(lambda: _has_deferred(redis))
    assert sink.received == []
    config = make_config(redis_url, relay, starttls="require", tls_ca_file=str(private_ca[0]))
    await run_until_settled(redis, config)
    assert [r.tls for r in sink.received] == [True]


async def test_a_ca_file_makes_starttls_required(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink, tmp_path: Path
) -> None:
    """A relay that offers no STARTTLS (or one whose offer someone in the middle struck
    out) gets nothing when its certificate is to be checked: under auto it was sent the
    message in clear, the CA file checking nothing."""
    private_ca = make_certificate(tmp_path / "ca", ca=True)
    await enqueue(redis, send_message(["ann@example.com"]))
    config = make_config(redis_url, sink.url, tls_ca_file=str(private_ca[0]))
    async with running_worker(config):
        await wait_until(lambda: _has_deferred(redis))
    assert sink.received == []


def test_starttls_off_with_a_ca_file_is_refused_at_start(certificate: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="--starttls off sends in clear"):
        make_config(
            "redis://127.0.0.1:1/0", "smtp://127.0.0.1:25", starttls="off",
            tls_ca_file=str(certificate[0]),
        )  # fmt: skip


@pytest.mark.parametrize("starttls", ["auto", "opportunistic"])
async def test_credentials_are_not_sent_to_a_relay_that_offers_no_starttls(
    redis: aioredis.Redis,
    redis_url: str,
    make_sink: Callable[..., RecordingSink],
    starttls: str,
) -> None:
    """A relay offering AUTH in clear and no STARTTLS: the worker sent it the password
    (so would someone in the middle who struck STARTTLS out of a relay's EHLO)."""
    sink = make_sink(users={"mailer": PASSWORD}, auth_in_clear=True)
    await enqueue(redis, send_message(["ann@example.com"]))
    relay = f"smtp://mailer:{PASSWORD}@127.0.0.1:{sink.port}"
    async with running_worker(make_config(redis_url, relay, starttls=starttls)):
        await wait_until(lambda: _has_deferred(redis))
    assert sink.logins_tried == [] and sink.received == []
    [deferred] = [e for e in await events(redis) if e["event"] == "deferred"]
    assert "credentials are not sent unencrypted" in deferred["error"]


async def test_starttls_off_logs_in_over_plain_text(
    redis: aioredis.Redis, redis_url: str, make_sink: Callable[..., RecordingSink]
) -> None:
    sink = make_sink(users={"mailer": PASSWORD}, auth_in_clear=True)
    await enqueue(redis, send_message(["ann@example.com"]))
    relay = f"smtp://mailer:{PASSWORD}@127.0.0.1:{sink.port}"
    await run_until_settled(redis, make_config(redis_url, relay, starttls="off"))
    assert [(r.login, r.tls) for r in sink.received] == [("mailer", False)]


async def _has_deferred(redis: aioredis.Redis) -> bool:
    return any(e["event"] == "deferred" for e in await events(redis))


@pytest.mark.parametrize("login", [None, "mailer"], ids=["no-credentials", "credentials"])
async def test_opportunistic_starttls_encrypts_without_verifying_the_certificate(
    redis: aioredis.Redis,
    redis_url: str,
    make_sink: Callable[..., RecordingSink],
    certificate: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    login: str | None,
) -> None:
    """A relay with a certificate nobody signed (auto defers it, see above): Postfix's
    `may`, encrypted all the same, and the worker says at start that it does not verify,
    and that credentials go over that TLS (to anyone in the middle: any certificate will
    do), which only a docstring said."""
    sink = make_sink(certificate=certificate, users={login: PASSWORD} if login else None)
    await enqueue(redis, send_message(["ann@example.com"]))
    relay = f"smtp://{login}:{PASSWORD}@127.0.0.1:{sink.port}" if login else sink.url
    await run_until_settled(redis, make_config(redis_url, relay, starttls="opportunistic"))
    assert [(r.login, r.tls) for r in sink.received] == [(login, True)]
    logged = "".join(capsys.readouterr())  # structlog's default output in tests: stdout
    assert "relay_tls_unverified" in logged and "opportunistic" in logged
    assert ("to anyone in the middle" in logged) == (login is not None)
    assert PASSWORD not in logged


async def test_opportunistic_starttls_sends_in_clear_when_not_offered(
    redis: aioredis.Redis, redis_url: str, sink: RecordingSink
) -> None:
    await enqueue(redis, send_message(["ann@example.com"]))
    await run_until_settled(redis, make_config(redis_url, sink.url, starttls="opportunistic"))
    assert [r.tls for r in sink.received] == [False]


@pytest.mark.parametrize(
    ("relay", "options", "message"),
    [
        ("smtps://127.0.0.1:465", {}, "is for smtp:// relays"),
        ("smtp://127.0.0.1:25", {"tls_ca_file": "CA"}, "leave out --tls-ca-file"),
        ("smtp://127.0.0.1:25", {"starttls": "maybe"}, "not auto, require, opportunistic or off"),
    ],
    ids=["smtps", "ca-file", "unknown-mode"],
)
def test_opportunistic_starttls_is_refused_where_it_means_nothing(
    relay: str, options: dict[str, str], message: str, certificate: tuple[Path, Path]
) -> None:
    settings = {"starttls": "opportunistic", **options}
    if settings.get("tls_ca_file") == "CA":
        settings["tls_ca_file"] = str(certificate[0])
    with pytest.raises(ConfigError, match=message):
        make_config("redis://127.0.0.1:1/0", relay, **settings)

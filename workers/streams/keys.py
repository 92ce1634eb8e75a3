"""The Redis keys mailpool uses (names configurable, defaults from the contract)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.config import CommonConfig


@dataclass(frozen=True)
class StreamKeys:
    receive: str = "email.receive"
    send: str = "email.send"
    dead: str = "email.send.dead"
    events: str = "email.send.events"
    # Every other key (retry schedule, idempotency records, locks) lives under this prefix.
    prefix: str = "mailpool:"

    @classmethod
    def from_config(cls, config: CommonConfig) -> StreamKeys:
        return cls(
            receive=config.receive_stream,
            send=config.send_stream,
            dead=config.dead_stream,
            events=config.events_stream,
            prefix=config.key_prefix,
        )

    def internal(self, *parts: str) -> str:
        """A key under the internal prefix, e.g. ``internal("retry")`` -> ``mailpool:retry``."""
        return self.prefix + ":".join(parts)

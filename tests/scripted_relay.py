"""A minimal SMTP relay on asyncio streams whose replies and delays are scripted per stage,
for what aiosmtpd will not do: answer with a line too long or a code outside 2xx-5xx, or
wait before each RCPT.  Stages are command verbs (b"MAIL", b"RCPT", ...) and b"." for the
reply to the final dot; every other command gets a plain 250."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(session: Session) -> AsyncIterator[str]:
    """Serve ``session`` (one SMTP connection each) on a free loopback port; yields the
    relay URL."""
    server = await asyncio.start_server(session, "127.0.0.1", 0)
    async with server:
        yield f"smtp://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@dataclass
class ScriptedRelay:
    replies: dict[bytes, bytes] = field(default_factory=dict)  # stage -> reply line
    delays: dict[bytes, float] = field(default_factory=dict)  # stage -> seconds before it
    messages: int = 0  # final dots read
    stages: list[bytes] = field(default_factory=list)  # as they came, over all connections
    pipelining: bool = False  # offer PIPELINING (the client then writes its group at once)
    _connections: set[asyncio.StreamWriter] = field(default_factory=set)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            writer.write(b"220 scripted.test ESMTP\r\n")
            while line := await reader.readline():
                stage = line.upper().split(b" ", 1)[0].split(b":", 1)[0].rstrip(b"\r\n")
                self.stages.append(stage)
                if stage == b"DATA" and stage not in self.replies:
                    writer.write(b"354 go ahead\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    self.messages += 1
                    stage = b"."
                await asyncio.sleep(self.delays.get(stage, 0.0))
                writer.write(self._reply(stage) + b"\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up (as it does after a timeout or an unreadable reply)
        finally:
            self._connections.discard(writer)
            writer.close()

    def _reply(self, stage: bytes) -> bytes:
        if stage in self.replies:
            return self.replies[stage]
        ehlo = b"250-scripted.test\r\n250 PIPELINING" if self.pipelining else b"250 scripted.test"
        defaults = {b"EHLO": ehlo, b"QUIT": b"221 bye", b".": b"250 2.0.0 queued"}
        return defaults.get(stage, b"250 OK")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve on a free loopback port; yields the relay URL."""
        server = await asyncio.start_server(self.session, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"smtp://127.0.0.1:{port}"
            for writer in list(self._connections):
                writer.close()

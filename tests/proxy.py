"""A TCP proxy for the tests: put it between the pool and PostgreSQL, then break the link.

``cut()`` closes every open connection and refuses new ones (a crashed host
answering RST); ``blackhole()`` keeps connections open but drops every byte
both ways (a dead network path: callers hang until a timeout); ``delay(s)``
adds latency to each chunk; ``doom()`` makes the connections open now fail at the
client's next byte, new ones unharmed (a link a firewall dropped silently, a backend
dying as it is used: nothing to see until a query is sent); ``restore()`` heals the
link.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.mode = "pass"  # pass | cut | blackhole
        self.latency = 0.0
        self.connections = 0  # accepted so far
        self._writers: set[asyncio.StreamWriter] = set()
        self._doomed: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, self.host, 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "cut":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            self._doomed.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if writer in self._doomed:
                break  # the byte never arrives: both ends are reset
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.mode == "blackhole":
                continue
            writer.write(data)
            await writer.drain()
        writer.transport.abort()

    def _call(self, fn: Any) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def cut(self) -> None:
        """Drop every connection (RST) and refuse new ones."""

        def do() -> None:
            self.mode = "cut"
            for w in list(self._writers):
                w.transport.abort()

        self._call(do)

    def doom(self) -> None:
        """Reset each connection open now when its client next sends (both ends)."""
        self._call(lambda: self._doomed.update(self._writers))

    def blackhole(self) -> None:
        """Keep connections open but deliver nothing, either way."""
        self._call(lambda: setattr(self, "mode", "blackhole"))

    def delay(self, seconds: float) -> None:
        self._call(lambda: setattr(self, "latency", seconds))

    def restore(self) -> None:
        def do() -> None:
            self.mode = "pass"
            self.latency = 0.0

        self._call(do)

    def close(self) -> None:
        def do() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        self._call(do)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._loop.close()

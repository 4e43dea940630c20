"""trio edge of the NBD server: sockets in, `tap.nbd` events, the write log and replica out.

The ack path is the guest's critical path in exact mode, so a WRITE is appended to the log,
applied to the replica and acked in the same pass, with no task switch and no copy we can avoid.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tap import nbd
from tap.replica import BlockReplica
from tap.writelog import KIND_FLUSH, KIND_TRIM, KIND_WRITE, KIND_ZEROES, WriteLog

log = logging.getLogger("mirrorfs.tap")


@dataclass
class TapStats:
    writes: int = 0
    bytes: int = 0
    flushes: int = 0
    reads: int = 0
    connections: int = 0
    errors: int = 0
    last_error: str = ""


@dataclass
class TapBackend:
    """What the export does with each command: record it (unless read-only) and keep the replica."""

    replica: BlockReplica
    writelog: WriteLog | None = None
    stats: TapStats = field(default_factory=TapStats)
    on_append: Callable[[int], None] | None = None

    @property
    def readonly(self) -> bool:
        return self.writelog is None

    def _record(self, kind: int, offset: int, length: int, payload: bytes | memoryview = b"") -> int:
        assert self.writelog is not None
        seq = self.writelog.append(kind, offset, length, payload)
        self.replica.applied_seq = seq
        if self.on_append is not None:
            self.on_append(seq)
        return seq

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._record(KIND_WRITE, offset, len(data), data)
        self.replica.write(offset, data)
        self.stats.writes += 1
        self.stats.bytes += len(data)

    def zeroes(self, offset: int, length: int) -> None:
        self._record(KIND_ZEROES, offset, length)
        self.replica.zero(offset, length)
        self.stats.writes += 1

    def trim(self, offset: int, length: int) -> None:
        self._record(KIND_TRIM, offset, length)

    async def flush(self) -> None:
        if self.readonly:
            return
        self._record(KIND_FLUSH, 0, 0)
        self.stats.flushes += 1
        await trio.to_thread.run_sync(self.writelog.flush)

    def read(self, offset: int, length: int) -> bytes:
        self.stats.reads += 1
        return self.replica.read(offset, length)


def _errno_reply(exc: OSError) -> int:
    return nbd.ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT) else nbd.EIO


async def serve_connection(stream: trio.abc.Stream, exports: dict[str, nbd.Export],
                           backend: TapBackend) -> None:
    """Speak NBD on one connection until the client leaves or misbehaves."""
    proto = nbd.NBDServer(exports=exports)
    backend.stats.connections += 1
    try:
        await stream.send_all(proto.data_to_send())
        while not proto.closed:
            data = await stream.receive_some(1 << 20)
            if not data:
                proto.connection_lost()
                break
            proto.receive_data(data)
            while (ev := proto.next_event()) is not None:
                await _handle(proto, ev, backend)
            out = proto.data_to_send()
            if out:
                await stream.send_all(out)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


async def _handle(proto: nbd.NBDServer, ev: object, backend: TapBackend) -> None:
    try:
        match ev:
            case nbd.Write(handle=h, offset=off, data=data):
                backend.write(off, data)
                proto.reply(h)
            case nbd.WriteZeroes(handle=h, offset=off, length=n):
                backend.zeroes(off, n)
                proto.reply(h)
            case nbd.Trim(handle=h, offset=off, length=n):
                backend.trim(off, n)
                proto.reply(h)
            case nbd.Flush(handle=h):
                await backend.flush()
                proto.reply(h)
            case nbd.Read(handle=h, offset=off, length=n):
                proto.reply(h, data=backend.read(off, n))
            case nbd.ProtocolError(message=m):
                backend.stats.errors += 1
                backend.stats.last_error = m
                log.warning("NBD client dropped: %s", m)
    except OSError as exc:
        # Never pretend a write was recorded: fail it, QEMU's job pauses (on-target-error=stop)
        # and re-sends once the cause (usually a full disk) is fixed.
        backend.stats.errors += 1
        backend.stats.last_error = f"cannot record a write: {exc}"
        log.error("cannot record: %s", exc)
        handle = getattr(ev, "handle", None)
        if handle is not None:
            proto.reply(handle, error=_errno_reply(exc))


def parse_listen(addr: str) -> tuple[str, str | Path, int]:
    """`unix:PATH` or `tcp:HOST:PORT` → (kind, host-or-path, port)."""
    kind, _, rest = addr.partition(":")
    if kind == "unix" and rest:
        return "unix", Path(rest), 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return "tcp", host.strip("[]"), int(port)
    raise ValueError(f"bad listen address {addr!r}: use unix:/path/to/sock or tcp:HOST:PORT")


async def open_listeners(addrs: list[str]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    for addr in addrs:
        kind, where, port = parse_listen(addr)
        if kind == "unix":
            path = Path(where)
            if path.is_socket():
                path.unlink()  # stale: the caller holds the state-dir lock
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.bind(os.fspath(path))
            sock.listen(16)
            listeners.append(trio.SocketListener(sock))
        else:
            listeners.extend(await trio.open_tcp_listeners(port, host=str(where)))
    return listeners


async def serve_nbd(listeners: list[trio.SocketListener], exports: dict[str, nbd.Export],
                    backend: TapBackend, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
    """Serve every client concurrently; one bad client never stops the others."""
    async def handler(stream: trio.abc.Stream) -> None:
        await serve_connection(stream, exports, backend)

    await trio.serve_listeners(handler, listeners, task_status=task_status)

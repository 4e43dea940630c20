"""trio edge of QMP: one connection, commands awaited by id, events delivered in order."""

from __future__ import annotations

import errno
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tap.qmp import Error, Event, Greeting, ProtocolError, QMPProtocol, Return

GREETING_TIMEOUT = 5.0
MAX_QUEUED_EVENTS = 10_000  # QEMU sends few events; past this the client is not being read and we fail


class QMPError(Exception):
    """A command failed; `cls` and `desc` are QEMU's own words."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({cls})")
        self.command, self.cls, self.desc = command, cls, desc


class QMPConnectError(Exception):
    """The QMP socket cannot be used; the message says why and what to do."""


class QMPClient:
    def __init__(self, stream: trio.SocketStream, path: Path) -> None:
        self._stream = stream
        self.path = path
        self._proto = QMPProtocol()
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._events_send, self._events = trio.open_memory_channel[Event](MAX_QUEUED_EVENTS)
        self.greeting: Greeting | None = None
        self.closed = trio.Event()
        self.close_reason = ""

    async def _reader(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            while True:
                try:
                    data = await self._stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
                if not data:
                    self._close("QEMU closed the QMP connection (did QEMU exit?)")
                    return
                for msg in self._proto.receive_data(data):
                    match msg:
                        case Greeting():
                            self.greeting = msg
                            if not started:
                                started = True
                                task_status.started()
                        case Return(id=cid) | Error(id=cid):
                            waiter = self._waiting.pop(cid, None) if isinstance(cid, int) else None
                            if waiter is not None:
                                waiter[1].append(msg)
                                waiter[0].set()
                        case Event():
                            try:
                                self._events_send.send_nowait(msg)
                            except trio.WouldBlock:
                                self._close("too many unread QMP events")
                                return
                        case ProtocolError(message=m):
                            self._close(m)
                            return
        finally:
            if not started:
                task_status.started()

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self._events_send.close()
        for ev, _ in self._waiting.values():
            ev.set()
        self._waiting.clear()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float = 30.0) -> Any:
        """Run one command; return its value or raise QMPError with QEMU's message."""
        if self.closed.is_set():
            raise QMPConnectError(self.close_reason)
        cid, wire = self._proto.command(command, arguments)
        done = trio.Event()
        box: list[Any] = []
        self._waiting[cid] = (done, box)
        await self._stream.send_all(wire)
        with trio.move_on_after(timeout) as scope:
            await done.wait()
        if scope.cancelled_caught:
            self._waiting.pop(cid, None)
            raise QMPError(command, "Timeout", f"no answer from QEMU within {timeout:.0f} s")
        if not box:
            raise QMPConnectError(self.close_reason)
        msg = box[0]
        if isinstance(msg, Error):
            raise QMPError(command, msg.cls, msg.desc)
        return msg.value

    async def next_event(self) -> Event | None:
        """The next event, or None once the connection is closed."""
        try:
            return await self._events.receive()
        except trio.EndOfChannel:
            return None

    async def wait_event(self, match: Callable[[Event], bool], timeout: float = math.inf) -> Event | None:
        """First event that `match` accepts, or None on timeout or close; others are dropped."""
        with trio.move_on_after(timeout):
            while (ev := await self.next_event()) is not None:
                if match(ev):
                    return ev
        return None


@asynccontextmanager
async def open_qmp(path: Path) -> AsyncIterator[QMPClient]:
    """Connect, read the greeting, negotiate capabilities; the connection lives for the block."""
    path = Path(path)
    if not path.exists():
        raise QMPConnectError(
            f"no QMP socket at {path}: start QEMU with `-qmp unix:{path},server=on,wait=off` "
            "(or qemu-storage-daemon with `--chardev socket,id=qmp,path=...,server=on,wait=off "
            "--monitor chardev=qmp`) and pass that path to --qmp")
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            raise QMPConnectError(f"nothing listens on the QMP socket {path} (has QEMU exited?)") from exc
        raise QMPConnectError(f"cannot connect to the QMP socket {path}: {exc.strerror}") from exc
    async with stream, trio.open_nursery() as nursery:
        client = QMPClient(stream, path)
        with trio.move_on_after(GREETING_TIMEOUT):
            await nursery.start(client._reader)
        if client.greeting is None:
            nursery.cancel_scope.cancel()
            raise QMPConnectError(
                f"QEMU did not greet on {path} within {GREETING_TIMEOUT:.0f} s: its QMP socket serves one "
                "client at a time and another holds it: another `mirrorfs attach`, or libvirtd if this VM runs "
                "under libvirt (libvirt keeps QMP for itself: attach with --domain NAME instead, through libvirt's "
                "own block copy; see mirrorfs-attach(1) LIBVIRT)"
                if not client.closed.is_set() else f"QMP connection to {path} failed: {client.close_reason}")
        await client.execute("qmp_capabilities")
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()

"""The subscription socket: a live engine's mutation events, filtered, to local subscribers (JSON lines).

The server tails the event log (DIR/events.jsonl) rather than hooking the engine: the log is the one record
every consumer shares, and tailing it keeps the engine loop free of sockets. One tailer task reads each new
line once, parses it once if anyone listens, and offers it to every subscriber whose filter matches, with
`send_nowait` into that subscriber's bounded buffer. The tailer never waits for a subscriber, so a slow one
never slows the engine (nor, through it, anything else). A subscriber whose buffer fills is switched to
catch-up: it is sent `{"lagged": {...}}`, then reads the event log file itself from just after the last event
it was sent, and rejoins the live feed once it has caught up: no event is lost and none is sent twice.

Protocol (mirrorfs-events(5)): the client sends one line, a JSON object
`{"filter": {...}, "after": "SEQ-N", "since": SEQ}` (all optional; without "after"/"since" it gets events
from now on), and receives `{"ok": {"filter": ..., "position": "SEQ-N"}}` then one event per line.
A malformed or oversize request gets `{"error": "..."}` and the connection is closed; the server goes on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from inference.eventlog import EventTail
from inference.events import format_id, parse_id
from inference.wake import DirWake
from mirrorfs.stream.filters import Filter, FilterError, union_prefixes
from tap.state import bind_socket, prepare_socket, remove_socket
from tap.state import socket_path as state_socket_path

log = logging.getLogger("mirrorfs.stream")

MAX_REQUEST = 16384          # bytes of the first line
REQUEST_TIMEOUT = 10.0       # seconds to send it
BUFFER_EVENTS = 1024         # per subscriber, live feed
MAX_SUBSCRIBERS = 64
POLL_INTERVAL = 0.05  # only where inotify is unavailable
SOCKET_NAME = "events.sock"


class RequestError(ValueError):
    pass


@dataclass
class Request:
    filter: Filter
    after: tuple[int, int] | None = None  # resume just after this event position
    since: int | None = None              # or from the first event with seq >= since


def parse_request(line: bytes) -> Request:
    """The subscriber's first line, validated (it comes from any local process)."""
    if len(line) > MAX_REQUEST:
        raise RequestError(f"request too large: more than {MAX_REQUEST} bytes")
    try:
        obj = json.loads(line) if line.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object: {\"filter\": {...}, \"after\": \"SEQ-N\", \"since\": SEQ}")
    unknown = set(obj) - {"filter", "after", "since"}
    if unknown:
        raise RequestError(f"unknown request field(s): {', '.join(sorted(unknown))[:200]}")
    try:
        flt = Filter.from_obj(obj.get("filter"))
    except FilterError as exc:
        raise RequestError(str(exc)) from None
    after = obj.get("after")
    if after is not None:
        if not isinstance(after, str):
            raise RequestError("'after' must be an event id \"SEQ-N\"")
        try:
            after_pos: tuple[int, int] | None = parse_id(after)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
    else:
        after_pos = None
    since = obj.get("since")
    if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
        raise RequestError("'since' must be a non-negative integer seq")
    return Request(flt, after_pos, since)


def _fast_position(line: bytes) -> tuple[int, int] | None:
    """The id of a log line without parsing it (EventLog writes the id first)."""
    if line.startswith(b'{"id":"'):
        end = line.find(b'"', 7)
        try:
            return parse_id(line[7:end].decode())
        except ValueError:
            return None
    return None


def _position(d: dict[str, Any]) -> tuple[int, int]:
    return parse_id(d["id"]) if d.get("id") else (int(d.get("seq", 0)), 0)


@dataclass(eq=False)
class Subscriber:
    filter: Filter
    send: trio.MemorySendChannel
    receive: trio.MemoryReceiveChannel
    live: bool = False
    lagged: int = 0
    last: tuple[int, int] = (0, 0)       # position of the last event handed to this subscriber
    offset: int = 0                      # log offset just after it (or where catch-up resumes)
    stats: dict[str, int] = field(default_factory=lambda: {"sent": 0, "lagged": 0})


class StreamServer:
    """Serves one state directory's event log on a unix socket. Runs in a trio task (`serve`)."""

    def __init__(self, events_path: Path, socket_path: Path, *, buffer: int = BUFFER_EVENTS,
                 max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self.events_path = Path(events_path)
        self.socket_path = Path(socket_path)
        self.buffer = buffer
        self.max_subscribers = max_subscribers
        self.subscribers: set[Subscriber] = set()
        self.tail = EventTail(self.events_path)
        self._progress = trio.Event()  # set (and replaced) each time the tailer reads more of the log
        self.last: tuple[int, int] = (0, 0)
        self.scope: tuple[str, ...] | None = None   # union of the subscribers' path prefixes (None: any)
        self.counters = {"connections": 0, "errors": 0, "lagged": 0}

    # -- the tailer: one reader of the log, fan-out without waiting

    def _fan_out(self, lines: list[tuple[int, bytes]]) -> None:
        live = [s for s in self.subscribers if s.live]
        for end, line in lines:
            if not live:
                self.last = _fast_position(line) or self.last
                continue
            try:
                d = json.loads(line)
            except ValueError:
                continue
            pos = _position(d)
            self.last = pos
            for s in live:
                if not s.live or pos <= s.last:
                    continue
                if s.filter.matches(d):
                    try:
                        s.send.send_nowait((end, pos, line))
                    except trio.WouldBlock:
                        s.live = False          # its task notices, says "lagged", and catches up from the file
                        s.lagged += 1
                        self.counters["lagged"] += 1
                        continue
                s.last, s.offset = pos, end

    async def _tailer(self) -> None:
        """Read what the engine appends as it appends it: woken by inotify on the log's directory."""
        with DirWake(self.events_path.parent) as wake:
            while True:
                wake.drain()  # before the read: an append after it wakes the wait below
                lines = await trio.to_thread.run_sync(self.tail.poll)
                if self.tail.restarted:
                    self.tail.restarted = False
                    for s in self.subscribers:     # the log was rewritten (a new replay): ids repeat from the start
                        s.last, s.offset = (0, 0), 0
                if lines:
                    self._fan_out(lines)
                    self._progress.set()
                    self._progress = trio.Event()
                elif wake.fileno() >= 0:
                    await trio.lowlevel.wait_readable(wake.fileno())
                else:
                    await trio.sleep(POLL_INTERVAL)  # no inotify here: follow by polling

    # -- one subscriber

    async def _catch_up(self, stream: trio.SocketStream, sub: Subscriber) -> None:
        """Send what the log holds after sub.offset, filtered, then rejoin the live feed. Joining is atomic:
        no await between seeing that we reached the tailer's offset and `live = True`."""
        tail = EventTail(self.events_path, sub.offset)
        try:
            while True:
                lines = await trio.to_thread.run_sync(tail.poll, 1 << 18)
                for end, line in lines:
                    if end > self.tail.offset:
                        break                    # the tailer has not read it yet: the live feed will bring it
                    try:
                        d = json.loads(line)
                    except ValueError:
                        continue
                    pos = _position(d)
                    if pos > sub.last and sub.filter.matches(d):
                        await stream.send_all(line + b"\n")
                        sub.stats["sent"] += 1
                    sub.last, sub.offset = max(pos, sub.last), end
                if not lines and tail.offset <= self.tail.offset:
                    sub.offset = max(sub.offset, tail.offset)   # blank lines, or nothing new
                if sub.offset >= self.tail.offset:
                    sub.last = max(sub.last, self.last)
                    sub.live = True
                    return
                if not lines:
                    await self._progress.wait()  # the tailer has yet to read as far: until it reads more
        finally:
            tail.close()

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        self.counters["connections"] += 1
        async with stream:
            try:
                line = await self._read_request(stream)
                req = parse_request(line)
                if len(self.subscribers) >= self.max_subscribers:
                    raise RequestError(f"too many subscribers (at most {self.max_subscribers})")
            except RequestError as exc:
                self.counters["errors"] += 1
                await self._reply_error(stream, str(exc))
                return
            send, receive = trio.open_memory_channel[tuple[int, tuple[int, int], bytes]](self.buffer)
            sub = Subscriber(req.filter, send, receive)
            if req.after is None and req.since is None:
                sub.last, sub.offset, sub.live = self.last, self.tail.offset, True
            else:
                sub.last = req.after if req.after is not None else (req.since - 1 if req.since else 0, 1 << 62)
            self.subscribers.add(sub)
            self._update_scope()
            try:
                hello = {"ok": {"filter": req.filter.to_obj(), "position": format_id(*self.last)}}
                await stream.send_all(json.dumps(hello).encode() + b"\n")
                await self._pump(stream, sub)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self.subscribers.discard(sub)
                self._update_scope()

    async def _pump(self, stream: trio.SocketStream, sub: Subscriber) -> None:
        while True:
            if not sub.live:
                await self._drain_then_catch_up(stream, sub)
                continue
            item = None
            with trio.move_on_after(1.0):
                item = await sub.receive.receive()
            if item is not None:
                await stream.send_all(item[2] + b"\n")   # never cancelled mid-line
                sub.stats["sent"] += 1

    async def _drain_then_catch_up(self, stream: trio.SocketStream, sub: Subscriber) -> None:
        """Lagged (or resuming): send what is buffered, say so if it lagged, then read the log from where the
        tailer stopped offering (sub.last / sub.offset)."""
        while True:
            try:
                _end, _pos, line = sub.receive.receive_nowait()
            except trio.WouldBlock:
                break
            await stream.send_all(line + b"\n")
            sub.stats["sent"] += 1
        if sub.lagged > sub.stats["lagged"]:
            note = {"lagged": {"after": format_id(*sub.last), "times": sub.lagged,
                               "detail": "buffer full; catching up from the event log"}}
            await stream.send_all(json.dumps(note).encode() + b"\n")
            sub.stats["lagged"] = sub.lagged
        await self._catch_up(stream, sub)

    async def _read_request(self, stream: trio.SocketStream) -> bytes:
        buf = b""
        with trio.move_on_after(REQUEST_TIMEOUT) as scope:
            while b"\n" not in buf:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REQUEST:
                    raise RequestError(f"request too large: more than {MAX_REQUEST} bytes")
        if scope.cancelled_caught:
            raise RequestError(f"no request line within {REQUEST_TIMEOUT:.0f} s")
        return buf.split(b"\n", 1)[0]

    async def _reply_error(self, stream: trio.SocketStream, message: str) -> None:
        try:
            with trio.move_on_after(2):
                await stream.send_all(json.dumps({"error": message}).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def _update_scope(self) -> None:
        self.scope = union_prefixes(s.filter for s in self.subscribers)

    # -- the listener

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        prepare_socket(self.socket_path)   # a stale socket removed; a /tmp fallback directory made private
        # 0600, or 0660 root:GROUP with --group, from the bind on (never chmod'ed by path): see tap.state
        sock = trio.socket.from_stdlib_socket(bind_socket(self.socket_path, read_only=True))
        sock.listen(64)
        listener = trio.SocketListener(sock)
        # start at the end of what is there: live subscribers get new events, resumers read the file
        while await trio.to_thread.run_sync(self.tail.poll):
            pass
        if self.tail.offset:
            from inference.eventlog import last_position
            self.last = last_position(self.events_path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tailer)
                task_status.started()
                await trio.serve_listeners(self._serve_one, [listener], handler_nursery=nursery)
        finally:
            self.tail.close()
            remove_socket(self.socket_path)


def socket_path(state_dir: Path) -> Path:
    """DIR/events.sock, or events.sock in a private directory in /tmp when DIR is too deep for a unix socket
    path (108 bytes): tap.state.socket_path."""
    return state_socket_path(state_dir, SOCKET_NAME)


class BackgroundServer:
    """A StreamServer on its own thread with its own trio loop, for the synchronous engine loop in
    `mirrorfs replay --follow`: the engine only appends to the log; the thread does all socket work."""

    def __init__(self, state_dir: Path) -> None:
        self.server = StreamServer(Path(state_dir) / "events.jsonl", socket_path(state_dir))
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mirrorfs-stream", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.server.serve)
                    self._ready.set()
        try:
            trio.run(main)
        except BaseException as exc:  # reported by start(); the engine goes on without subscribers
            self._error = exc
            log.warning("subscription socket stopped: %s", exc)
        finally:
            self._ready.set()

    def start(self, timeout: float = 10) -> BackgroundServer:
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise OSError(f"cannot serve subscribers on {self.server.socket_path}: {self._error}")
        return self

    @property
    def scope(self) -> tuple[str, ...] | None:
        return self.server.scope

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)


async def subscribe(socket_path: Path, flt: Filter | None = None, *, after: str | None = None,
                    since: int | None = None) -> trio.SocketStream:
    """Client side: connect, send the request, check the reply; the stream then yields JSON lines."""
    stream = await trio.open_unix_socket(os.fspath(socket_path))
    req: dict[str, Any] = {"filter": (flt or Filter()).to_obj()}
    if after:
        req["after"] = after
    if since is not None:
        req["since"] = since
    await stream.send_all(json.dumps(req).encode() + b"\n")
    return stream

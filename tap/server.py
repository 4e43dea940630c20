"""trio edge of the NBD server: sockets in, `tap.nbd` events, the write log and replica out.

The ack path is the guest's critical path in exact mode, so a WRITE is appended to the log,
applied to the replica and acked in the same pass, with no task switch and no copy we can avoid. Once a plain
(not TLS) connection has chosen its export, its requests are served by a thread of its own on the blocking
socket (`_transmit_blocking`): one `recv`, the sans-I/O core, the backend, one `send` per request, with no
event loop in between (two trio scheduler passes per request cost ~150 us of CPU per 4 KiB write). trio keeps
the handshake, TLS, the limits and cancellation (which shuts the socket down so the thread returns).
Every client may be hostile: replies waiting to be sent are bounded per connection (nbd.MAX_OUTSTANDING),
connections per listener set (MAX_CONNECTIONS), the handshake in time (HANDSHAKE_TIMEOUT), and with
TLS credentials nothing but NBD_OPT_STARTTLS is answered before the TLS handshake.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tap import nbd
from tap.replica import BlockReplica
from tap.state import bind_socket, prepare_socket
from tap.writelog import KIND_FLUSH, KIND_TRIM, KIND_WRITE, KIND_ZEROES, WriteLog

log = logging.getLogger("mirrorfs.tap")

MAX_CONNECTIONS = 16  # per serve_nbd() call; one more is closed at once
HANDSHAKE_TIMEOUT = 30.0  # seconds from accept to an export chosen (TLS handshake included)
RECEIVE_SIZE = 1 << 20
# QEMU's tls-creds-x509 layout (endpoint=server, verify-peer=on): the CA that signs both ends, our certificate
# and key; ca-crl.pem is optional.
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
TLS_PSK_UNSUPPORTED = ("TLS-PSK is not available: Python 3.11's ssl module has no PSK API (it arrives in "
                       "Python 3.13); give x509 credentials with --tls-creds DIR instead (ca-cert.pem, "
                       "server-cert.pem, server-key.pem, as QEMU's tls-creds-x509 takes them)")


class TLSConfigError(ValueError):
    """The TLS credentials cannot be used; the message names the file, the cause and the fix."""


def _no_key_password() -> bytes:
    raise TLSConfigError("the key is encrypted")


def server_tls_context(creds: Path) -> ssl.SSLContext:
    """A server context from a QEMU-style x509 credentials directory, verifying client certificates
    against ca-cert.pem (as QEMU's verify-peer=on default does): TLS without client certificates would
    encrypt the disk for anyone who asks, which authenticates nobody."""
    creds = Path(creds)
    missing = [name for name in TLS_FILES if not (creds / name).is_file()]
    if missing:
        raise TLSConfigError(f"--tls-creds {creds}: missing {', '.join(missing)} (the directory holds "
                             f"{', '.join(TLS_FILES)}, as QEMU's tls-creds-x509 endpoint=server takes them)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec's floor
    ctx.verify_mode = ssl.CERT_REQUIRED
    step = "server-cert.pem/server-key.pem"
    try:
        ctx.load_cert_chain(creds / "server-cert.pem", creds / "server-key.pem", password=_no_key_password)
        step = "ca-cert.pem"
        ctx.load_verify_locations(cafile=creds / "ca-cert.pem")
        if (creds / "ca-crl.pem").is_file():
            step = "ca-crl.pem"
            ctx.load_verify_locations(cafile=creds / "ca-crl.pem")
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError, TLSConfigError) as exc:
        raise TLSConfigError(f"--tls-creds {creds}: cannot use {step}: {exc} (PEM files are expected; "
                             "an encrypted key is not supported)") from None
    return ctx


# Upper bounds (ns) of the write-latency histogram's buckets: the ack path's own cost is tens of µs, a slow disk's
# fsync (FUA, --fsync always) milliseconds.
LATENCY_BOUNDS_NS = (25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000, 5_000_000, 20_000_000,
                     100_000_000)


@dataclass
class TapStats:
    writes: int = 0
    bytes: int = 0
    flushes: int = 0
    reads: int = 0
    connections: int = 0
    refused: int = 0  # connections closed at once: over MAX_CONNECTIONS
    errors: int = 0
    last_error: str = ""
    # writes by the time from their request's arrival to their reply's send (LATENCY_BOUNDS_NS, then +Inf)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    latency_sum_ns: int = 0

    def observe(self, elapsed_ns: int, writes: int) -> None:
        """`writes` writes answered `elapsed_ns` after their request arrived (one receive's batch)."""
        self.latency_counts[bisect_left(LATENCY_BOUNDS_NS, elapsed_ns)] += writes
        self.latency_sum_ns += elapsed_ns * writes

    def latency(self) -> dict:
        """Prometheus-style cumulative buckets in seconds, for attach.json (the engine's metrics serve them)."""
        total, buckets = 0, []
        for bound, n in zip((*LATENCY_BOUNDS_NS, None), self.latency_counts, strict=True):
            total += n
            buckets.append(["+Inf" if bound is None else bound / 1e9, total])
        return {"buckets": buckets, "sum": self.latency_sum_ns / 1e9}


@dataclass
class TapBackend:
    """What the export does with each command: record it (unless read-only) and keep the replica.

    Connections call it from their own threads: `lock` makes each record and its replica write one step,
    so the log's seq order is the replica's order, and a resync (tap.verify) can check and write atomically.
    A WRITE is two calls under one hold of the lock, `log_write` then `apply_write`, so that a transport can
    send the ack between them: the guest waits for the log, not for the replica, which the log rebuilds."""

    replica: BlockReplica
    writelog: WriteLog | None = None
    stats: TapStats = field(default_factory=TapStats)
    lock: threading.RLock = field(default_factory=threading.RLock)
    lagging: str = ""  # why the replica stopped following the log ("" while it follows)

    @property
    def readonly(self) -> bool:
        return self.writelog is None

    def _record(self, kind: int, offset: int, length: int) -> int:
        """A record with nothing to apply to the replica (ZEROES applies its own)."""
        assert self.writelog is not None
        seq = self.writelog.append(kind, offset, length)
        if not self.lagging:
            self.replica.applied_seq = seq
        return seq

    def log_write(self, offset: int, data: bytes | memoryview) -> int:
        """A WRITE's record, in the log file when this returns (under `lock`, then `apply_write`); its seq."""
        assert self.writelog is not None
        n = len(data)
        seq = self.writelog.append(KIND_WRITE, offset, n, data)
        stats = self.stats
        stats.writes += 1
        stats.bytes += n
        return seq

    def apply_write(self, seq: int, offset: int, data: bytes | memoryview) -> None:
        """The record's replica write, in the same hold of `lock` as `log_write` (it may follow the ack). It never
        fails the write, which is in the log: on an error the replica stops following the log (`lagging`)."""
        self._apply(seq, self.replica.write, offset, data)

    def _apply(self, seq: int, change, *args) -> None:
        if self.lagging:
            return
        try:
            change(*args)
        except OSError as exc:
            self._lag(seq, exc)
        else:
            self.replica.applied_seq = seq

    def _lag(self, seq: int, exc: OSError) -> None:
        """From here on the replica keeps seq - 1 (its sidecar says so at the checkpoint), reads of it fail, and the
        next attach brings it up to date from the log, which has every write."""
        self.lagging = (f"the replica stopped following the log at seq {seq - 1}: writing seq {seq} to it failed "
                        f"({exc}); the log has every write, and the next attach brings the replica up to date")
        self.stats.errors += 1
        self.stats.last_error = self.lagging
        log.error("%s", self.lagging)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Logged (written to the log file) before this returns, so before the ack; with `fua` (NBD_CMD_FLAG_FUA)
        also fsynced, unless the policy is "never"."""
        with self.lock:
            self.apply_write(self.log_write(offset, data), offset, data)
        if fua:
            self.sync()

    def zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        with self.lock:
            assert self.writelog is not None
            seq = self.writelog.append(KIND_ZEROES, offset, length)
            self.stats.writes += 1
            self._apply(seq, self.replica.zero, offset, length)
        if fua:
            self.sync()

    def trim(self, offset: int, length: int) -> None:
        with self.lock:
            self._record(KIND_TRIM, offset, length)

    def flush_record(self) -> bool:
        """Log an NBD FLUSH; False on a read-only export (nothing to make durable)."""
        if self.readonly:
            return False
        with self.lock:
            self._record(KIND_FLUSH, 0, 0)
            self.stats.flushes += 1
        return True

    def sync(self) -> None:
        """fsync the log per its policy (blocking: from a connection's thread, or a worker thread)."""
        if self.writelog is not None:
            self.writelog.flush()

    async def flush(self) -> None:
        if self.flush_record():
            await trio.to_thread.run_sync(self.sync)

    def read(self, offset: int, length: int) -> bytes:
        """Under `lock`: a write acked on another connection may still be on its way to the replica."""
        self.stats.reads += 1
        with self.lock:
            if self.lagging:
                raise OSError(errno.EIO, self.lagging)
            return self.replica.read(offset, length)


def _errno_reply(exc: OSError) -> int:
    return nbd.ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT) else nbd.EIO


class _Conn:
    """The stream a connection speaks on: the socket, then the SSLStream over it after STARTTLS."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream


async def serve_connection(stream: trio.abc.Stream, exports: dict[str, nbd.Export],
                           backend: TapBackend, *, tls: ssl.SSLContext | None = None) -> None:
    """Speak NBD on one connection until the client leaves or misbehaves; with `tls`, only over TLS."""
    proto = nbd.NBDServer(exports=exports, tls=tls is not None)
    backend.stats.connections += 1
    conn = _Conn(stream)
    try:
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as deadline:
            await stream.send_all(proto.data_to_send())  # the greeting
            chosen = await _negotiate(conn, proto, backend, tls)
        if deadline.cancelled_caught:
            _drop(backend, f"no export chosen within {HANDSHAKE_TIMEOUT:.0f} s of connecting")
        elif chosen:
            if isinstance(conn.stream, trio.SocketStream):
                await _transmit_in_thread(conn.stream, proto, backend)
            else:
                await _transmit(conn.stream, proto, backend)
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLError):  # a failed TLS handshake: no or a bad certificate
            _drop(backend, f"TLS: {exc.__cause__}")
    except (trio.ClosedResourceError, ConnectionError):
        pass
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await conn.stream.aclose()


def _drop(backend: TapBackend, message: str) -> None:
    backend.stats.errors += 1
    backend.stats.last_error = message
    log.warning("NBD client dropped: %s", message)


async def _negotiate(conn: _Conn, proto: nbd.NBDServer, backend: TapBackend, tls: ssl.SSLContext | None) -> bool:
    """Option haggling, and the TLS upgrade on STARTTLS; True once an export is chosen."""
    while not proto.closed:
        while (ev := proto.next_event()) is not None:
            if isinstance(ev, nbd.ExportSelected):
                return True
            if isinstance(ev, nbd.StartTLS):
                assert tls is not None  # NBDServer acks STARTTLS only when told TLS is configured
                await conn.stream.send_all(proto.data_to_send())  # the ACK, in clear
                conn.stream = trio.SSLStream(conn.stream, tls, server_side=True)
                await conn.stream.do_handshake()
            else:
                await _handle(proto, ev, backend)  # Disconnect, ProtocolError
        out = proto.data_to_send()
        if out:
            await conn.stream.send_all(out)
        if proto.closed:
            break
        data = await conn.stream.receive_some(RECEIVE_SIZE)
        if not data:
            proto.connection_lost()
            break
        proto.receive_data(data)
    return False


async def _transmit(stream: trio.abc.Stream, proto: nbd.NBDServer, backend: TapBackend) -> None:
    """The request loop. Replies go out once per received chunk, or sooner when SEND_THRESHOLD bytes wait:
    then no further request is taken until they are sent, so a client that never reads its replies stalls
    only itself, holding at most nbd.MAX_OUTSTANDING of ours. The check is a length compare per event."""
    next_event, receive_some, send_all = proto.next_event, stream.receive_some, stream.send_all
    threshold = nbd.SEND_THRESHOLD
    while True:
        while (ev := next_event()) is not None:
            await _handle(proto, ev, backend)
            if proto.queued_output >= threshold:
                await send_all(proto.data_to_send())
        out = proto.data_to_send()
        if out:
            await send_all(out)
        if proto.closed:
            return
        data = await receive_some(RECEIVE_SIZE)
        if not data:
            proto.connection_lost()
            return
        proto.receive_data(data)


async def _transmit_in_thread(stream: trio.SocketStream, proto: nbd.NBDServer, backend: TapBackend) -> None:
    """Run the request loop in a thread of its own on a blocking duplicate of the socket. Cancelled (detach,
    Ctrl-C), it shuts the socket down, which ends the thread's `recv`, and waits for the request in hand."""
    sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
    sock.setblocking(True)
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _transmit_blocking(sock, proto, backend)
        except (ConnectionError, OSError):
            pass  # the client went away, or we shut the socket down
        except BaseException as exc:  # a bug of ours: raised in the trio task below
            failure.append(exc)
        finally:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

    thread = threading.Thread(target=run, name="nbd-connection", daemon=True)
    thread.start()
    try:
        await done.wait()
    finally:
        if not done.is_set():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            with trio.CancelScope(shield=True):
                await done.wait()
        thread.join()
        sock.close()
    if failure:
        raise failure[0]


def _transmit_blocking(sock: socket.socket, proto: nbd.NBDServer, backend: TapBackend) -> None:
    """The request loop of `_transmit`, blocking, in a connection's own thread. Per 4 KiB WRITE at depth 1: one
    `recv_into` (two when the payload trails its header), the parse, the log's `writev`, the ack's `send`, then
    the replica's `pwrite`, all under the backend's lock: the guest waits for the log only. Requests that arrive
    together (depth > 1) are all handled before their replies go out in one `send`. Received bytes are parsed
    in place (`receive_borrowed`): every event of a receive is done with before the next one."""
    next_event, receive, data_to_send = proto.next_event, proto.receive_borrowed, proto.data_to_send
    recv_into, sendall = sock.recv_into, sock.sendall
    buf = bytearray(RECEIVE_SIZE)
    view = memoryview(buf)
    threshold = nbd.SEND_THRESHOLD
    Write, FUA, WAITALL = nbd.Write, nbd.CMD_FLAG_FUA, socket.MSG_WAITALL
    lock, log_write, apply_write, write, reply = (backend.lock, backend.log_write, backend.apply_write,
                                                  backend.write, proto.reply)
    stats, clock = backend.stats, time.perf_counter_ns
    arrived = clock()
    while True:
        answered = 0  # writes of this receive's batch
        unsent: bytes | memoryview = b""  # replies the early send left (the client's receive buffer is full)
        acked = 0  # when the early send went out
        while (ev := next_event()) is not None:
            if type(ev) is Write:
                offset, data = ev.offset, ev.data
                if ev.flags & FUA:  # fsynced before the ack: the replica first, in the usual order
                    try:
                        write(offset, data, True)
                    except OSError as exc:
                        _failed(proto, ev, backend, exc)
                        continue
                    reply(ev.handle)
                else:
                    with lock:
                        try:
                            seq = log_write(offset, data)
                        except OSError as exc:
                            _failed(proto, ev, backend, exc)
                            continue
                        reply(ev.handle)
                        if proto.drained:  # the last request in hand: ack now, the replica after
                            unsent = _send_nowait(sock, data_to_send())
                            acked = clock()
                        apply_write(seq, offset, data)
                answered += 1
            else:
                _handle_sync(proto, ev, backend)
            if proto.queued_output >= threshold:
                sendall(data_to_send())
        if unsent:
            sendall(unsent)
        out = data_to_send()
        if out:
            sendall(out)
        if answered:
            stats.observe((acked or clock()) - arrived, answered)
        if proto.closed:
            return
        wanted = proto.payload_wanted  # a WRITE's header came alone: wait for its whole payload in one recv
        n = recv_into(buf, wanted, WAITALL) if 0 < wanted <= RECEIVE_SIZE else recv_into(buf)
        if not n:
            proto.connection_lost()
            return
        arrived = clock()
        receive(view[:n])


def _send_nowait(sock: socket.socket, out: bytes | bytearray) -> bytes | memoryview:
    """Send what the socket takes without blocking (under the backend's lock: a client that does not read its
    replies must not hold it); the rest, for a blocking send once the lock is released. A failed send is
    retried there too, so that it raises where nothing is left undone."""
    try:
        n = sock.send(out, socket.MSG_DONTWAIT)
    except OSError:
        n = 0
    return memoryview(out)[n:] if n < len(out) else b""


def _handle_sync(proto: nbd.NBDServer, ev: object, backend: TapBackend) -> None:
    """Every event but a WRITE, in a connection's thread (a FLUSH fsyncs right here: QEMU waits for it)."""
    try:
        match ev:
            case nbd.WriteZeroes(handle=h, offset=off, length=n, flags=f):
                backend.zeroes(off, n, f & nbd.CMD_FLAG_FUA != 0)
                proto.reply(h)
            case nbd.Trim(handle=h, offset=off, length=n):
                backend.trim(off, n)
                proto.reply(h)
            case nbd.Flush(handle=h):
                if backend.flush_record():
                    backend.sync()
                proto.reply(h)
            case nbd.Read(handle=h, offset=off, length=n):
                proto.reply(h, data=backend.read(off, n))
            case nbd.ProtocolError(message=m):
                _drop(backend, m)
    except OSError as exc:
        _failed(proto, ev, backend, exc)


def _failed(proto: nbd.NBDServer, ev: object, backend: TapBackend, exc: OSError) -> None:
    """Never pretend a write was recorded: fail it, QEMU's job pauses (on-target-error=stop) and re-sends once
    the cause (usually a full disk) is fixed."""
    backend.stats.errors += 1
    what = "read the replica" if type(ev) is nbd.Read else "record a write"
    backend.stats.last_error = f"cannot {what}: {exc}"
    log.error("cannot %s: %s", what, exc)
    handle = getattr(ev, "handle", None)
    if handle is not None:
        proto.reply(handle, error=_errno_reply(exc))


async def _handle(proto: nbd.NBDServer, ev: object, backend: TapBackend) -> None:
    try:
        match ev:
            case nbd.Write(handle=h, offset=off, data=data, flags=f):
                backend.write(off, data)
                if f & nbd.CMD_FLAG_FUA:
                    await trio.to_thread.run_sync(backend.sync)
                proto.reply(h)
            case nbd.WriteZeroes(handle=h, offset=off, length=n, flags=f):
                backend.zeroes(off, n)
                if f & nbd.CMD_FLAG_FUA:
                    await trio.to_thread.run_sync(backend.sync)
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
                _drop(backend, m)
    except OSError as exc:
        _failed(proto, ev, backend, exc)


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


def check_listen(addrs: list[str] | tuple[str, ...], *, tls: bool, read_only: bool, fix: str) -> None:
    """Refuse a tcp listener that would serve a writable export without TLS: anyone who reaches the port
    could read the disk and inject writes. `fix` completes the one-line error with what the caller can do."""
    for addr in addrs:
        if parse_listen(addr)[0] == "tcp" and not tls and not read_only:
            raise TLSConfigError(f"--listen {addr} would serve the disk to anyone who reaches the port, with no "
                                 f"authentication: {fix}")


async def open_listeners(addrs: list[str], *, read_only: bool = False) -> list[trio.SocketListener]:
    """Listeners for `addrs`. A unix socket is 0600 root's, whatever the umask; `read_only` (the export served
    on it never takes writes) lets --group in, otherwise only --qemu-group may connect (see tap.state)."""
    listeners: list[trio.SocketListener] = []
    for addr in addrs:
        kind, where, port = parse_listen(addr)
        if kind == "unix":
            path = Path(where)
            prepare_socket(path)  # stale: the caller holds the state-dir lock; a /tmp fallback dir made private
            sock = trio.socket.from_stdlib_socket(bind_socket(path, read_only=read_only, what=f"--listen {addr}"))
            sock.listen(16)
            listeners.append(trio.SocketListener(sock))
        else:
            listeners.extend(await trio.open_tcp_listeners(port, host=str(where)))
    return listeners


async def serve_nbd(listeners: list[trio.SocketListener], exports: dict[str, nbd.Export],
                    backend: TapBackend, *, tls: ssl.SSLContext | None = None,
                    max_connections: int = MAX_CONNECTIONS,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve every client concurrently; one bad client never stops the others. At most `max_connections`
    at once across these listeners: one more is closed at once, with a log line."""
    active = 0

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal active
        if active >= max_connections:
            backend.stats.refused += 1
            log.warning("NBD connection refused: %d connections are open, the limit", max_connections)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            return
        active += 1
        try:
            await serve_connection(stream, exports, backend, tls=tls)
        finally:
            active -= 1

    await trio.serve_listeners(handler, listeners, task_status=task_status)

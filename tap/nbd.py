"""Sans-I/O NBD server (fixed newstyle, simple replies only): bytes in, events out, bytes to send.

QEMU's blockdev-mirror job writes the guest's disk writes to this server. No sockets here, so the protocol is
unit-tested and fuzzed without I/O, and the per-WRITE cost, which sits on the guest's critical path in exact
mode, stays a header unpack and one event. Every input byte comes from a possibly hostile client: allocations
are bounded (one option or one request payload at most) and no input makes receive_data/next_event raise.
Protocol reference: NetworkBlockDevice/nbd doc/proto.md.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

# Magics.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6

# Information types (NBD_OPT_INFO / NBD_OPT_GO).
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_FAST_ZERO = 1 << 4

# Error values for reply() (NBD's own numbering, equal to Linux errno).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# Limits: what we advertise, and what a hostile client may make us hold.
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 << 20  # largest READ/WRITE; also the NBD_INFO_BLOCK_SIZE maximum
MAX_OPTION_LENGTH = 64 << 10
MAX_STRING = 4096  # the spec's limit on names and descriptions
REQUEST_SIZE = 28
MAX_BUFFERED = MAX_PAYLOAD + REQUEST_SIZE  # bound on bytes held between calls once drained
# Reply bytes queued but not yet sent, per connection. A transport takes no further request (next_event)
# while `queued_output` >= SEND_THRESHOLD: it sends first. One event adds at most one reply (<= MAX_PAYLOAD
# plus a 16-byte header) on top, so a client that pipelines READs and never reads the replies makes us hold
# less than MAX_OUTSTANDING (33 MiB) of replies. WRITE acks (16 bytes) never reach the threshold within one
# received chunk, so the exact-mode ack path sends once per chunk, as before.
SEND_THRESHOLD = 1 << 20
MAX_OUTSTANDING = SEND_THRESHOLD + MAX_PAYLOAD + 16

# Wire layouts, declared once.
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT_REPLY = struct.Struct(">HQH")
INFO_BLOCK_SIZE_REPLY = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

_ZEROES_124 = bytes(124)
_EMPTY_VIEW = memoryview(b"")


@dataclass(frozen=True, slots=True)
class Export:
    """One disk we serve; `size` must equal the mirrored source disk's size or QEMU fails the job."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size out of range: {self.size}")
        if len(self.name.encode()) > MAX_STRING or len(self.description.encode()) > MAX_STRING:
            raise ValueError("export name or description longer than 4096 bytes")

    @property
    def transmission_flags(self) -> int:
        if self.read_only:
            return FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH
        return FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_TRIM


# Events. `handle` is the request's 64-bit cookie, to pass back to reply().
@dataclass(frozen=True, slots=True)
class ExportSelected:
    export: Export


@dataclass(frozen=True, slots=True)
class Write:
    """`data` may be a view into the bytes given to receive_data (no copy); it stays valid while held."""

    handle: int
    offset: int
    data: memoryview | bytes
    flags: int


@dataclass(frozen=True, slots=True)
class WriteZeroes:
    handle: int
    offset: int
    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class Flush:
    handle: int


@dataclass(frozen=True, slots=True)
class Trim:
    handle: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Read:
    handle: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged: send data_to_send() in clear, then run the TLS handshake as the
    server and carry every later byte over TLS. Nothing the client sent before its handshake is kept."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client left cleanly (NBD_CMD_DISC or NBD_OPT_ABORT)."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The client broke the protocol; the connection is closed (hard disconnect)."""

    message: str


_SET_HANDLE, _SET_OFFSET, _SET_DATA, _SET_FLAGS = (getattr(Write, f).__set__ for f in Write.__slots__)


def _new_write(handle: int, offset: int, data: memoryview, flags: int) -> Write:
    """Write(...) at half the cost: a frozen dataclass's __init__ calls object.__setattr__ per field."""
    event = object.__new__(Write)
    _SET_HANDLE(event, handle)
    _SET_OFFSET(event, offset)
    _SET_DATA(event, data)
    _SET_FLAGS(event, flags)
    return event


Event = ExportSelected | Write | WriteZeroes | Flush | Trim | Read | StartTLS | Disconnect | ProtocolError

_CLIENT_FLAGS, _OPTIONS, _TRANSMISSION = range(3)


class NBDServer:
    """One connection's NBD server state machine, in the manner of h11.

    Feed received bytes to receive_data(), drain next_event() until None, answer each command event with
    reply(), send data_to_send(). Requests that are invalid but framed (out of range, read-only, bad flags,
    unknown command) are answered here with an error and produce no event. With `tls=True` the server runs
    the spec's FORCEDTLS mode: every option before NBD_OPT_STARTTLS (but ABORT) gets NBD_REP_ERR_TLS_REQD,
    NBD_OPT_EXPORT_NAME hangs up, and STARTTLS yields a StartTLS event for the transport to act on.
    """

    def __init__(self, exports: Mapping[str, Export], *, tls: bool = False) -> None:
        for key, export in exports.items():
            if key != export.name:
                raise ValueError(f"export key {key!r} differs from its name {export.name!r}")
        self._exports = dict(exports)
        self._out = bytearray(GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        self._state = _CLIENT_FLAGS
        self._closed = False
        self._no_zeroes = False
        self._tls_required = tls
        self._tls_started = False
        self._export: Export | None = None
        self._size = 0
        self._read_only = False
        # Input: the chunk being parsed (and its view), chunks queued behind it, the partial frame copied
        # across chunk boundaries, and how many bytes of a refused WRITE payload remain to be skipped.
        self._cur = b""
        self._view = _EMPTY_VIEW
        self._pos = 0
        self._more: deque[bytes] = deque()
        self._part = bytearray()
        self._skip = 0
        self._option: tuple[int, int] | None = None  # (option, length) awaiting its data
        self._write: tuple[int, int, int, int] | None = None  # (handle, offset, length, flags) of a payload
        self._reads: dict[int, int] = {}  # handle -> length of READs awaiting reply()

    # --- public API -------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def export(self) -> Export | None:
        """The export chosen by the client, once transmission has begun."""
        return self._export

    @property
    def tls_started(self) -> bool:
        """STARTTLS was acknowledged: every later byte must travel inside TLS."""
        return self._tls_started

    @property
    def queued_output(self) -> int:
        """Bytes queued for the client and not yet taken by data_to_send() (see SEND_THRESHOLD)."""
        return len(self._out)

    @property
    def buffered(self) -> int:
        """Received bytes not yet parsed; at most MAX_BUFFERED once next_event() has returned None."""
        return len(self._part) + len(self._cur) - self._pos + sum(map(len, self._more))

    @property
    def payload_wanted(self) -> int:
        """Bytes still to receive to complete the WRITE payload being gathered (0 when none). A blocking transport
        can wait for all of them in one call: QEMU sends a WRITE's header and payload in two `sendmsg`s."""
        w = self._write
        if w is None:
            return 0
        return max(0, w[2] - len(self._part) - (len(self._cur) - self._pos) - sum(map(len, self._more)))

    @property
    def drained(self) -> bool:
        """Every received byte is parsed (or kept as a partial frame): what comes next needs a receive."""
        return self._pos == len(self._cur) and not self._more

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue received bytes; ignored once closed. End of stream is connection_lost(), not b""."""
        if self._closed or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer; events may hold views into ours
        if self._pos == len(self._cur) and not self._more:
            self._cur, self._view, self._pos = data, memoryview(data), 0
        else:
            self._more.append(data)

    def receive_borrowed(self, data: memoryview) -> None:
        """receive_data() without the copy: the caller leaves `data` untouched until next_event() has returned None
        (then every byte of it is parsed, or copied into a partial frame), and an event's `data` is valid only
        until then. Only while `drained`: a blocking transport that receives into one buffer."""
        if self._closed or not data:
            return
        if not self.drained:
            raise ValueError("receive_borrowed() before next_event() returned None")
        self._cur, self._view, self._pos = data, data, 0

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed (or the connection is closed)."""
        if self._closed:
            return None
        try:
            if self._state == _TRANSMISSION:
                return self._next_request()
            return self._next_handshake()
        except Exception as exc:  # a bug of ours; fail this connection rather than the transport
            return self._fail(f"internal error: {exc!r}")

    def reply(self, handle: int, error: int = 0, data: bytes | bytearray | memoryview = b"") -> None:
        """Queue the simple reply to a command event; `data` (exactly the length asked) only for a Read."""
        if self._reads and handle in self._reads:
            if error == 0 and len(data) != self._reads[handle]:
                raise ValueError(f"READ reply of {len(data)} bytes, {self._reads[handle]} requested")
            if error and data:
                raise ValueError("an error reply carries no data")
            del self._reads[handle]
        elif data:
            raise ValueError(f"data given but no READ with handle {handle:#x} awaits a reply")
        self._out += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        if data and not error:
            self._out += data

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the client since the last call (the greeting first)."""
        out = self._out
        if not out:
            return b""
        self._out = bytearray()
        return out

    def connection_lost(self) -> None:
        self._close()

    # --- input ------------------------------------------------------------------------------------------

    def _take(self, n: int) -> memoryview | None:
        """Exactly n bytes: a view when they lie in one chunk, else copied together; None if not all here."""
        pos = self._pos
        if not self._part and pos + n <= len(self._cur):
            self._pos = pos + n
            return self._view[pos : pos + n]
        part = self._part
        while True:
            avail = len(self._cur) - pos
            need = n - len(part)
            if not part and avail >= n:
                self._pos = pos + n
                return self._view[pos : pos + n]
            if avail >= need:
                part += self._view[pos : pos + need]
                self._pos = pos + need
                self._part = bytearray()
                return memoryview(part)
            if avail:
                part += self._view[pos:]
            if not self._more:
                self._cur, self._view, self._pos = b"", _EMPTY_VIEW, 0
                return None
            self._cur = self._more.popleft()
            self._view, self._pos, pos = memoryview(self._cur), 0, 0

    def _skipped(self) -> bool:
        """Drop the rest of a refused WRITE payload as it arrives, without holding it."""
        while self._skip:
            avail = len(self._cur) - self._pos
            if avail >= self._skip:
                self._pos += self._skip
                self._skip = 0
                break
            self._skip -= avail
            if not self._more:
                self._cur, self._view, self._pos = b"", _EMPTY_VIEW, 0
                return False
            self._cur = self._more.popleft()
            self._view, self._pos = memoryview(self._cur), 0
        return True

    def _close(self) -> None:
        self._closed = True
        self._cur, self._view, self._pos = b"", _EMPTY_VIEW, 0
        self._more.clear()
        self._part = bytearray()
        self._option = self._write = None
        self._skip = 0

    def _fail(self, message: str) -> ProtocolError:
        self._close()
        return ProtocolError(message)

    # --- handshake --------------------------------------------------------------------------------------

    def _next_handshake(self) -> Event | None:
        if self._state == _CLIENT_FLAGS:
            raw = self._take(CLIENT_FLAGS.size)
            if raw is None:
                return None
            (flags,) = CLIENT_FLAGS.unpack(raw)
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                return self._fail(f"unknown client flags {flags:#x}")
            if self._tls_required and not flags & FLAG_C_FIXED_NEWSTYLE:
                return self._fail("TLS is required and needs fixed newstyle negotiation, which the client lacks")
            self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self._state = _OPTIONS
        while True:
            if self._option is None:
                raw = self._take(OPTION_HEADER.size)
                if raw is None:
                    return None
                magic, option, length = OPTION_HEADER.unpack(raw)
                if magic != IHAVEOPT:
                    return self._fail(f"bad option magic {magic:#x}")
                if length > MAX_OPTION_LENGTH:
                    return self._fail(f"option {option} data of {length} bytes is too long")
                self._option = (option, length)
            option, length = self._option
            data = self._take(length)
            if data is None:
                return None
            self._option = None
            event = self._handle_option(option, bytes(data))
            if event is not None:
                return event

    def _opt_reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(data))
        self._out += data

    def _lookup(self, raw: bytes) -> Export | None:
        """An export by name; the empty name means the only export, if there is exactly one."""
        if not raw:
            return next(iter(self._exports.values())) if len(self._exports) == 1 else None
        try:
            return self._exports.get(raw.decode())
        except UnicodeDecodeError:
            return None

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == OPT_STARTTLS:
            return self._starttls(data)
        if self._tls_required and not self._tls_started and option != OPT_ABORT:
            if option == OPT_EXPORT_NAME:  # cannot be answered with an error: the spec says hang up
                return self._fail("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, and this server requires TLS")
            self._opt_reply(option, REP_ERR_TLS_REQD, b"this server requires TLS: send NBD_OPT_STARTTLS first")
            return None
        if option == OPT_EXPORT_NAME:
            export = self._lookup(data)
            if export is None:  # this option cannot return an error: the spec says hang up
                return self._fail(f"unknown export {data[:64]!r}")
            self._out += EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags)
            if not self._no_zeroes:
                self._out += _ZEROES_124
            return self._enter(export)
        if option in (OPT_INFO, OPT_GO):
            return self._info(option, data)
        if option == OPT_LIST:
            if data:
                self._opt_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return None
            for export in self._exports.values():
                name = export.name.encode()
                self._opt_reply(option, REP_SERVER, U32.pack(len(name)) + name)
            self._opt_reply(option, REP_ACK)
            return None
        if option == OPT_ABORT:
            self._opt_reply(option, REP_ACK)
            self._close()
            return Disconnect()
        # NBD_OPT_STRUCTURED_REPLY included: we only ever send simple replies.
        self._opt_reply(option, REP_ERR_UNSUP)
        return None

    def _starttls(self, data: bytes) -> Event | None:
        if not self._tls_required:
            self._opt_reply(OPT_STARTTLS, REP_ERR_UNSUP)  # NOTLS mode
            return None
        if self._tls_started:
            self._opt_reply(OPT_STARTTLS, REP_ERR_INVALID, b"TLS is already running")
            return None
        if data:
            self._opt_reply(OPT_STARTTLS, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            return None
        if self.buffered:
            # Bytes sent in clear behind STARTTLS, before the ACK: taking them as if they came through TLS
            # is the STARTTLS injection flaw (cf. CVE-2011-0411). The client broke the protocol: hang up.
            return self._fail("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        self._opt_reply(OPT_STARTTLS, REP_ACK)
        self._tls_started = True
        return StartTLS()

    def _info(self, option: int, data: bytes) -> Event | None:
        if len(data) < 6:
            self._opt_reply(option, REP_ERR_INVALID, b"option data too short")
            return None
        (name_len,) = U32.unpack_from(data)
        if name_len > min(MAX_STRING, len(data) - 6):
            self._opt_reply(option, REP_ERR_INVALID, b"bad export name length")
            return None
        name = data[4 : 4 + name_len]
        (count,) = U16.unpack_from(data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            self._opt_reply(option, REP_ERR_INVALID, b"bad information request count")
            return None
        export = self._lookup(name)
        if export is None:
            self._opt_reply(option, REP_ERR_UNKNOWN, b"unknown export")
            return None
        wanted = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        self._opt_reply(option, REP_INFO, INFO_EXPORT_REPLY.pack(INFO_EXPORT, export.size,
                                                                 export.transmission_flags))
        if INFO_NAME in wanted:
            self._opt_reply(option, REP_INFO, U16.pack(INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in wanted:
            self._opt_reply(option, REP_INFO, U16.pack(INFO_DESCRIPTION) + export.description.encode())
        if INFO_BLOCK_SIZE in wanted:
            self._opt_reply(option, REP_INFO, INFO_BLOCK_SIZE_REPLY.pack(
                INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD))
        self._opt_reply(option, REP_ACK)
        return self._enter(export) if option == OPT_GO else None

    def _enter(self, export: Export) -> ExportSelected:
        self._state = _TRANSMISSION
        self._export, self._size, self._read_only = export, export.size, export.read_only
        return ExportSelected(export)

    # --- transmission -----------------------------------------------------------------------------------

    def _finish_write(self) -> Write | None:
        """Gather a WRITE payload split across chunks, or skip a refused one."""
        if self._write is not None:
            data = self._take(self._write[2])
            if data is None:
                return None
            handle, offset, _, flags = self._write
            self._write = None
            return _new_write(handle, offset, data, flags)
        self._skipped()
        return None

    def _error(self, handle: int, error: int) -> None:
        self._out += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)

    def _next_request(self) -> Event | None:
        while True:
            if self._write is not None or self._skip:
                event = self._finish_write()
                if event is not None or self._write is not None or self._skip:
                    return event
            pos, cur = self._pos, self._cur
            if not self._part and pos + REQUEST_SIZE <= len(cur):  # fast path: the header is in this chunk
                magic, flags, kind, handle, offset, length = REQUEST.unpack_from(cur, pos)
                pos = self._pos = pos + REQUEST_SIZE
            else:
                raw = self._take(REQUEST_SIZE)
                if raw is None:
                    return None
                magic, flags, kind, handle, offset, length = REQUEST.unpack(raw)
                pos, cur = self._pos, self._cur
            if magic != REQUEST_MAGIC:
                return self._fail(f"bad request magic {magic:#x}")
            end = offset + length
            if kind == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    return self._fail(f"WRITE of {length} bytes exceeds the maximum payload")
                error = (EINVAL if flags & ~CMD_FLAG_FUA else EPERM if self._read_only
                         else ENOSPC if end > self._size else 0)
                if error or not length:
                    self._error(handle, error)
                    self._skip = length
                    continue
                if not self._part and pos + length <= len(cur):  # fast path: the payload is in this chunk
                    self._pos = pos + length
                    return _new_write(handle, offset, self._view[pos : pos + length], flags)
                self._write = (handle, offset, length, flags)
                continue
            if kind == CMD_WRITE_ZEROES:
                error = (EINVAL if flags & ~(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) else EPERM if self._read_only
                         else ENOSPC if end > self._size else 0)
                if error or not length:
                    self._error(handle, error)
                    continue
                return WriteZeroes(handle, offset, length, flags)
            if kind == CMD_FLUSH:
                if flags & ~CMD_FLAG_FUA or offset or length:
                    self._error(handle, EINVAL)
                    continue
                return Flush(handle)
            if kind == CMD_TRIM:
                error = (EINVAL if flags & ~CMD_FLAG_FUA else EPERM if self._read_only
                         else EINVAL if end > self._size else 0)
                if error or not length:
                    self._error(handle, error)
                    continue
                return Trim(handle, offset, length)
            if kind == CMD_READ:
                if length > MAX_PAYLOAD:
                    return self._fail(f"READ of {length} bytes exceeds the maximum payload")
                # DF is refused: it belongs to structured replies. A READ reusing an unanswered handle is
                # refused too, so that reply() can check each READ reply's length.
                error = EINVAL if flags & ~CMD_FLAG_FUA or end > self._size or handle in self._reads else 0
                if error or not length:
                    self._error(handle, error)
                    continue
                self._reads[handle] = length
                return Read(handle, offset, length)
            if kind == CMD_DISC:
                self._close()
                return Disconnect()
            self._error(handle, EINVAL)  # CACHE, BLOCK_STATUS (needs structured replies), unknown

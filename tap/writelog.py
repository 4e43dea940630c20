"""The write log: every write the tap receives, appended durably before it is acked.

Everything downstream (replica, inference engine) is derived from this log, so it is the truth of what
arrived. A directory holds segments named by the seq of their first record (`00000000000000000001.wlog`);
a new segment starts once the current one has reached `segment_bytes`.

Segment header (24 bytes, little-endian): magic b"MFSWLOG\\n", u32 format version (1), u32 header size (24),
u64 seq of the first record (equal to the file name).

Record (40-byte header + payload, little-endian, struct "<4sIQQQIB3x"):

    0  4s   magic  b"WLR1"
    4  u32  crc32  zlib.crc32 of bytes 8..40 of the header followed by the payload
    8  u64  seq    1, 2, 3, ... without gaps across segments
   16  u64  time_ns  host receive time (time.time_ns())
   24  u64  offset   byte offset on the disk
   32  u32  length   bytes covered on the disk; the payload has this size for WRITE, is empty otherwise
   36  u8   kind     1 write, 2 zeroes, 3 flush, 4 trim
   37  3x   padding

Crash safety: one writer (flock on the directory) appends with one writev per record. Opening the log scans
the last segment and truncates a torn or corrupt tail (SIGKILL mid-append, or power loss after an unflushed
append), so seq continues from the last good record with no gap and no garbage. Readers in other processes
never return a torn record: they stop at the first incomplete or bad record of the last segment and retry
there on the next poll. Open the WriteLog (its recovery) before starting readers after a power loss.

Idempotence: after a reconnect QEMU re-sends the writes that were in flight. They are logged again as new
records (the log records what arrived, not what is new); replaying them is idempotent, since a re-sent write
carries the same data for the same range and everything is applied in seq order.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

log = logging.getLogger("mirrorfs.writelog")


class Kind(IntEnum):
    """What a record does to the disk; the member names are the lower-case names used in events."""

    write = 1
    zeroes = 2
    flush = 3
    trim = 4


KIND_WRITE, KIND_ZEROES, KIND_FLUSH, KIND_TRIM = 1, 2, 3, 4
_KINDS = frozenset(Kind)

HEADER = struct.Struct("<4sIQQQIB3x")
MAGIC = b"WLR1"
SEGMENT_HEADER = struct.Struct("<8sIIQ")
SEGMENT_MAGIC = b"MFSWLOG\n"
FORMAT_VERSION = 1
SUFFIX = ".wlog"
FSYNC_POLICIES = ("always", "flush", "never")
_CHUNK = 1 << 20


class CorruptLog(Exception):
    """The log is damaged somewhere other than its tail, or has an unknown format."""


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    time_ns: int
    kind: int
    offset: int
    length: int
    payload: bytes


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def list_segments(directory: Path) -> list[int]:
    """First seqs of the segments in `directory`, ascending (empty if it does not exist)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n[:20]) for n in names if len(n) == 25 and n.endswith(SUFFIX) and n[:20].isdigit())


def _check_segment_header(data: bytes, first_seq: int, path: Path) -> None:
    magic, version, hsize, seq = SEGMENT_HEADER.unpack(data)
    if magic != SEGMENT_MAGIC or hsize != SEGMENT_HEADER.size or seq != first_seq:
        raise CorruptLog(f"{path}: not a write log segment (bad segment header)")
    if version != FORMAT_VERSION:
        raise CorruptLog(f"{path}: write log format version {version}, this mirrorfs reads {FORMAT_VERSION}")


_MORE, _END, _TORN = 0, 1, 2  # batch limit reached; clean end of data; incomplete or bad record


def _read_batch(fd: int, off: int, since: int, expect: int, max_records: int, max_bytes: int,
                out: list[Record], path: Path) -> tuple[int, int, int]:
    """Parse records at `off` into `out`; returns (offset after the last good record, its seq + 1, status).

    Records below `since` are skipped by their header lengths without reading their payload (except the
    last one in the file, which may be torn and is checked so that the offset never lands inside garbage).
    """
    size = os.fstat(fd).st_size
    buf, base, nbytes, n0 = b"", off, 0, len(out)
    while len(out) - n0 < max_records and nbytes < max_bytes:
        pos = off - base
        if len(buf) - pos < HEADER.size:
            buf = os.pread(fd, HEADER.size if expect < since else _CHUNK, off)
            base, pos = off, 0
            if not buf:
                return off, expect, _END
            if len(buf) < HEADER.size:
                return off, expect, _TORN
        magic, crc, seq, t, offset, length, kind = HEADER.unpack_from(buf, pos)
        if magic != MAGIC or kind not in _KINDS:
            return off, expect, _TORN
        total = HEADER.size + (length if kind == KIND_WRITE else 0)
        if off + total > size:
            return off, expect, _TORN
        if seq < since and seq == expect and off + total < size:
            off, expect = off + total, seq + 1
            continue
        if len(buf) - pos < total:
            buf = os.pread(fd, max(_CHUNK, total), off)
            base, pos = off, 0
            if len(buf) < total:
                return off, expect, _TORN
        mv = memoryview(buf)[pos:pos + total]
        if zlib.crc32(mv[8:]) != crc:
            return off, expect, _TORN
        if seq != expect:
            raise CorruptLog(f"{path}: record at byte {off} has seq {seq}, expected {expect}")
        if seq >= since:
            out.append(Record(seq, t, kind, offset, length, bytes(mv[HEADER.size:])))
            nbytes += total
        off, expect = off + total, seq + 1
    return off, expect, _MORE


class WriteLog:
    """The single writer of a log directory: recovers the tail on open, then appends."""

    def __init__(self, directory: Path, *, fsync: str = "flush", segment_bytes: int = 64 << 20) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy {fsync!r}: expected one of {', '.join(FSYNC_POLICIES)}")
        if segment_bytes < SEGMENT_HEADER.size + HEADER.size:
            raise ValueError(f"segment_bytes {segment_bytes} is too small")
        self.directory = Path(directory)
        self.fsync_policy = fsync
        self.segment_bytes = segment_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dir_fd)
            raise RuntimeError(f"the write log {self.directory} is open by another writer") from None
        self._fd = -1
        self._unsynced: list[int] = []  # fds of rolled-over segments, fsynced and closed by flush()
        self._list_lock = threading.Lock()  # _unsynced and _dir_dirty, shared with a flushing thread
        self._sync_lock = threading.Lock()  # one flush at a time: it alone closes rolled-over fds
        self._dir_dirty = False
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def bytes_total(self) -> int:
        """Bytes of all segments on disk: the backlog a slow reader may have to catch up on."""
        return self._bytes_before + self._size

    def _recover(self) -> None:
        segs = list_segments(self.directory)
        if not segs:
            self._bytes_before, self._last_seq = 0, 0
            self._new_segment(1)
            return
        self._bytes_before = sum(os.stat(self.directory / segment_name(s)).st_size for s in segs[:-1])
        first = segs[-1]
        path = self.directory / segment_name(first)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        head = os.pread(self._fd, SEGMENT_HEADER.size, 0)
        if len(head) < SEGMENT_HEADER.size or not any(head):
            log.warning("write log %s: segment header torn, rewriting it", path)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, SEGMENT_HEADER.size, first))
        else:
            _check_segment_header(head, first, path)
        off, expect, status = SEGMENT_HEADER.size, first, _MORE
        while status == _MORE:
            off, expect, status = _read_batch(self._fd, off, 0, expect, 4096, 8 << 20, [], path)
        size = os.fstat(self._fd).st_size
        if off < size:
            log.warning("write log %s: dropping a torn tail of %d bytes after seq %d",
                        path, size - off, expect - 1)
            os.ftruncate(self._fd, off)
        self._size, self._last_seq = off, expect - 1

    def _new_segment(self, first_seq: int) -> None:
        fd = os.open(self.directory / segment_name(first_seq),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        os.write(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, SEGMENT_HEADER.size, first_seq))
        self._fd, self._size = fd, SEGMENT_HEADER.size
        with self._list_lock:
            self._dir_dirty = True
        if self.fsync_policy == "always":
            self._sync()

    def _roll(self) -> None:
        self._bytes_before += self._size
        if self.fsync_policy == "flush":
            with self._list_lock:
                self._unsynced.append(self._fd)  # no fsync on the append path: flush() covers it
        else:
            os.close(self._fd)
        self._fd = -1
        self._new_segment(self._last_seq + 1)

    def append(self, kind: int, offset: int, length: int, payload: bytes | memoryview = b"") -> int:
        """Append one record and return its seq; durable per the fsync policy when this returns."""
        n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if kind == KIND_WRITE:
            if n != length:
                raise ValueError(f"write of length {length} with a payload of {n} bytes")
        elif kind not in _KINDS or n:
            raise ValueError(f"record kind {kind} with a {n}-byte payload")
        if self._size >= self.segment_bytes:
            self._roll()
        seq = self._last_seq + 1
        try:
            rest = HEADER.pack(MAGIC, 0, seq, time.time_ns(), offset, length, kind)
        except struct.error as exc:
            raise ValueError(f"record out of range: offset {offset}, length {length}") from exc
        header = MAGIC + zlib.crc32(payload, zlib.crc32(rest[8:])).to_bytes(4, "little") + rest[8:]
        total = HEADER.size + n
        try:
            written = os.writev(self._fd, (header, payload)) if n else os.write(self._fd, header)
            if written != total:
                self._write_rest(header, payload, written)
        except BaseException:
            if self._fd >= 0:
                os.ftruncate(self._fd, self._size)  # never leave a torn record behind a live writer
            raise
        self._size += total
        self._last_seq = seq
        if self.fsync_policy == "always":
            self._sync()
        return seq

    def _write_rest(self, header: bytes, payload: bytes | memoryview, done: int) -> None:
        """Finish a short write (rare: a signal or a nearly full disk)."""
        for part in (memoryview(header), memoryview(payload).cast("B")):
            if done >= len(part):
                done -= len(part)
                continue
            part, done = part[done:], 0
            while part:
                k = os.write(self._fd, part)
                if k == 0:
                    raise OSError(errno.ENOSPC, "short write to the write log")
                part = part[k:]

    def _sync(self) -> None:
        with self._sync_lock:
            with self._list_lock:
                fds, self._unsynced = self._unsynced, []
                current, dir_dirty, self._dir_dirty = self._fd, self._dir_dirty, False
            for fd in fds:
                os.fdatasync(fd)
                os.close(fd)
            if current >= 0:
                os.fdatasync(current)  # if the writer rolls meanwhile, it sits in _unsynced, still open
            if dir_dirty:
                os.fsync(self._dir_fd)

    def flush(self) -> None:
        """Make every record appended so far durable (no-op with fsync="never").

        Safe to call from another thread while the owner appends: the tap fsyncs from a worker thread
        on NBD FLUSH and once a second, so the ack path never waits for the disk."""
        if self.fsync_policy != "never":
            self._sync()

    def close(self) -> None:
        if self._dir_fd < 0:
            return
        try:
            self.flush()
        finally:
            for fd in [*self._unsynced, self._fd]:
                if fd >= 0:
                    os.close(fd)
            self._unsynced.clear()
            self._fd = -1
            os.close(self._dir_fd)  # releases the flock
            self._dir_fd = -1

    def __enter__(self) -> WriteLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogFollower:
    """Reads a log that may be growing, batch by batch, from any process.

    Keeps one segment open and its offset; each poll returns at most `max_records` records and about
    `max_bytes` bytes (at least one record), so a huge backlog stays on disk, not in RAM.
    """

    def __init__(self, directory: Path, since: int = 1, *, max_records: int = 1024,
                 max_bytes: int = 8 << 20) -> None:
        self.directory = Path(directory)
        self.since = max(since, 1)
        self.max_records, self.max_bytes = max_records, max_bytes
        self._seg = 0  # first seq of the open segment, 0 while none is open
        self._fd = -1
        self._off = 0
        self._expect = 0

    @property
    def position(self) -> tuple[int, int]:
        """(first seq of the current segment, byte offset in it); (0, 0) before the first segment."""
        return self._seg, self._off

    def _open(self, first: int) -> bool:
        path = self.directory / segment_name(first)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        head = os.pread(fd, SEGMENT_HEADER.size, 0)
        if len(head) < SEGMENT_HEADER.size:  # the writer is creating it
            os.close(fd)
            if list_segments(self.directory)[-1] != first:
                raise CorruptLog(f"{path}: segment header missing")
            return False
        try:
            _check_segment_header(head, first, path)
        except CorruptLog:
            os.close(fd)
            raise
        self._close_fd()
        self._fd, self._seg, self._off, self._expect = fd, first, SEGMENT_HEADER.size, first
        return True

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def poll(self) -> list[Record]:
        """Records appended since the last poll (empty when there are none yet)."""
        out: list[Record] = []
        while True:
            if self._fd < 0:
                segs = list_segments(self.directory)
                if not segs:
                    return out
                start = max((s for s in segs if s <= self.since), default=segs[0])
                if not self._open(start):
                    return out
            status = self._read(out)
            if status == _MORE or out:
                return out
            nxt = min((s for s in list_segments(self.directory) if s > self._seg), default=0)
            if not nxt:
                return out
            # The writer has moved on, so this segment is complete: read it to its end once more.
            status = self._read(out)
            if out:
                return out
            if status != _END:
                raise CorruptLog(f"{self.directory / segment_name(self._seg)}: bad record at byte {self._off}"
                                 " before the end of a complete segment")
            if not self._open(nxt):
                return out

    def _read(self, out: list[Record]) -> int:
        self._off, self._expect, status = _read_batch(
            self._fd, self._off, self.since, self._expect, self.max_records, self.max_bytes, out,
            self.directory / segment_name(self._seg))
        return status

    def close(self) -> None:
        self._close_fd()

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(directory: Path, since: int = 1, until: int | None = None) -> Iterator[Record]:
    """Records with since <= seq <= until, as far as the log reached when the call started (never torn)."""
    segs = list_segments(directory)
    if not segs:
        return
    end = (segs[-1], os.stat(Path(directory) / segment_name(segs[-1])).st_size)
    with LogFollower(directory, since) as follower:
        while batch := follower.poll():
            for rec in batch:
                if until is not None and rec.seq > until:
                    return
                yield rec
            if follower.position >= end:
                return


def last_seq(directory: Path) -> int:
    """Seq of the last complete record in the log (0 when empty); reads only the last segment."""
    segs = list_segments(directory)
    if not segs:
        return 0
    last = segs[-1] - 1
    with LogFollower(directory, segs[-1], max_bytes=1 << 20) as follower:
        while batch := follower.poll():
            last = batch[-1].seq
    return last


async def follow(directory: Path, since: int = 1, *, interval: float = 0.05) -> AsyncIterator[Record]:
    """Every record from `since` on, forever, waiting `interval` seconds when caught up.

    File reads run in a worker thread so a slow disk never stalls the trio thread (the tap's ack path).
    """
    import trio

    with LogFollower(directory, since) as follower:
        while True:
            batch = await trio.to_thread.run_sync(follower.poll)
            for rec in batch:
                yield rec
            if not batch:
                await trio.sleep(interval)

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
append), so seq continues from the last good record with no gap and no garbage; it logs the segment, byte
and seqs it dropped. Readers never return a torn record: at a record that runs past the end of the last
segment (being written, or torn by a crash) they wait and retry on the next poll, and never scan into it.
Open the WriteLog (its recovery) before starting readers after a power loss.

Damage: a record that is bad anywhere else (a bit flip, a zeroed or torn region, a garbage length, a bad
segment header, a missing segment, seqs that do not follow) costs exactly the seqs it held. Readers resync
(at the next good record whose CRC matches and whose seq can follow, or at the next segment) and report a
`Gap` naming those seqs in their place, never a silent skip or a stop. The writer, finding such damage in
the middle of the last segment on start, starts a new segment so the damaged one is complete for readers.
CRC32 is no MAC: guest data inside a damaged record could pass for records, so nothing scans into a record
that runs past the end of the last segment (the one a crash tears): the writer truncates there. A damaged
length that runs past the end of the last segment therefore costs the rest of that segment too, without a
Gap: the bytes cannot tell it from a torn tail. The last segment is the last one on disk: with the segments
after it missing, a complete one is the last, and its records after such a length are lost (the writer names
the well-formed records it drops, as it cannot know whether they are real).

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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

# zlib's CRC-32 (the same values), about 15x faster: SIMD (PCLMULQDQ) where the CPU has it. It runs over every
# payload on the ack path, and over every record a reader takes.
from zlib_ng.zlib_ng import crc32

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
_REST = struct.Struct("<QQQIB3x")  # HEADER after magic and crc: what the crc covers, packed once per append
SEGMENT_HEADER = struct.Struct("<8sIIQ")
SEGMENT_MAGIC = b"MFSWLOG\n"
FORMAT_VERSION = 1
SUFFIX = ".wlog"
FSYNC_POLICIES = ("always", "flush", "never")
_CHUNK = 1 << 20


class CorruptLog(Exception):
    """The log is damaged somewhere other than its tail, or has an unknown format."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs first_seq..last_seq are lost: damaged or missing on disk. Readers give one in their place and go on
    with the next good record, so whoever consumes the log can say exactly what it missed."""

    first_seq: int
    last_seq: int
    segment: str  # file name of the segment where the loss was found
    offset: int   # byte in it where the damage starts
    why: str

    @property
    def seq(self) -> int:
        """Where the gap sits in seq order (its last lost seq)."""
        return self.last_seq

    def __str__(self) -> str:
        n = self.last_seq - self.first_seq + 1
        seqs = f"seq {self.first_seq}" if n == 1 else f"seqs {self.first_seq}-{self.last_seq} ({n} records)"
        return f"write log records lost: {seqs}, segment {self.segment} byte {self.offset}: {self.why}"


MAX_PAYLOAD = 64 << 20  # a longer WRITE is refused by append(): on disk, such a length field is damage
_SCAN_BUDGET = 1 << 30  # bytes of candidate records CRC-checked by one resync (bounds forged-magic floods)
_SHORT, _INCOMPLETE, _BADCRC, _BAD, _VALID = range(5)  # _probe's verdicts
_DAMAGE = {_SHORT: "a torn record (less than a header)", _INCOMPLETE: "a record running past the end of the data",
           _BADCRC: "a record failing its CRC", _BAD: "bytes that are not a record (magic, kind or length)"}


def _probe(fd: int, off: int, size: int) -> tuple[int, int, int]:
    """What is at `off`: (verdict, seq, total bytes the header claims); seq and total are 0 for _SHORT/_BAD."""
    hdr = os.pread(fd, HEADER.size, off)
    if len(hdr) < HEADER.size:
        return _SHORT, 0, 0
    magic, crc, seq, _t, _o, length, kind = HEADER.unpack(hdr)
    if magic != MAGIC or kind not in _KINDS or (kind == KIND_WRITE and length > MAX_PAYLOAD):
        return _BAD, 0, 0
    total = HEADER.size + (length if kind == KIND_WRITE else 0)
    data = hdr if total == HEADER.size else os.pread(fd, total, off) if off + total <= size else b""
    if len(data) < total:
        return _INCOMPLETE, seq, total
    return (_VALID if crc32(memoryview(data)[8:]) == crc else _BADCRC), seq, total


def _candidate(fd: int, p: int, size: int, expect: int, base: int, hi: int | None,
               hdr: bytes | None = None) -> tuple[int, int, int]:
    """Is a good record that can follow a damaged region [base, p) at `p`? (1 yes, 0 no, -1 not yet: the
    data is not all there), its seq, and the bytes checked. Its seq must exceed `expect`, stay at or below
    `hi` (the next segment's start - 1) and below expect + (p - base) / 40: no more records than fit were lost."""
    if p + HEADER.size > size:
        return -1, 0, 0
    if hdr is None:
        hdr = os.pread(fd, HEADER.size, p)
    magic, crc, seq, _t, _o, length, kind = HEADER.unpack(hdr)
    top = expect + (p - base) // HEADER.size
    if hi is not None:
        top = min(top, hi)
    if magic != MAGIC or kind not in _KINDS or not expect < seq <= top or (kind == KIND_WRITE
                                                                           and length > MAX_PAYLOAD):
        return 0, 0, 0
    total = HEADER.size + (length if kind == KIND_WRITE else 0)
    if p + total > size:
        return -1, 0, 0
    data = hdr if total == HEADER.size else os.pread(fd, total, p)
    if len(data) < total:
        return -1, 0, 0
    return (1 if crc32(memoryview(data)[8:]) == crc else 0), seq, total


def _find_record(fd: int, start: int, size: int, expect: int, base: int,
                 hi: int | None) -> tuple[tuple[int, int] | None, int]:
    """The first good record at or after `start` that can follow `expect` (see _candidate): ((offset, seq),
    _), or (None, offset where a later scan resumes once the file has grown)."""
    pos, pending, budget = start, None, _SCAN_BUDGET
    while pos + HEADER.size <= size:
        chunk = os.pread(fd, min(_CHUNK, size - pos), pos)
        if len(chunk) < HEADER.size:
            break
        i = chunk.find(MAGIC)
        while i >= 0:
            p = pos + i
            ok, seq, cost = _candidate(fd, p, size, expect, base, hi,
                                       chunk[i:i + HEADER.size] if i + HEADER.size <= len(chunk) else None)
            if ok > 0:
                return (p, seq), p
            if ok < 0 and pending is None:
                pending = p
            budget -= cost
            if budget < 0:
                log.warning("write log: gave up resyncing at byte %d: too many candidate records", p)
                return None, p
            i = chunk.find(MAGIC, i + 1)
        if pos + len(chunk) >= size:
            break
        pos += len(chunk) - len(MAGIC) + 1
    reached = max(start, size - HEADER.size + 1)
    return None, reached if pending is None else min(pending, reached)


def _count_torn(fd: int, off: int, size: int) -> tuple[int, bool]:
    """How many records a torn tail held, by its header lengths (at least 1), and whether that is all of it
    (False: bytes no header accounts for follow): for saying what was dropped."""
    n = 0
    while off < size:
        hdr = os.pread(fd, HEADER.size, off)
        if len(hdr) < HEADER.size:
            return max(n, 1), n == 0
        magic, _crc, _seq, _t, _o, length, kind = HEADER.unpack(hdr)
        if magic != MAGIC or kind not in _KINDS or (kind == KIND_WRITE and length > MAX_PAYLOAD):
            return max(n, 1), False
        n += 1
        off += HEADER.size + (length if kind == KIND_WRITE else 0)
    return max(n, 1), True


def _hidden_records(fd: int, off: int, size: int, torn: int) -> tuple[int, int] | None:
    """Seqs (first, last) of the good records that follow seq `torn` inside a torn tail at `off`: what
    the writer names, never keeps. They are real when a damaged length made a complete segment look torn
    (the segments after it missing), or guest data forged inside a torn payload: the bytes cannot tell."""
    found, _ = _find_record(fd, off + 1, size, torn, off, None)
    if found is None:
        return None
    pos, first = found
    last = first - 1
    while (probe := _probe(fd, pos, size))[0] == _VALID and probe[1] == last + 1:
        last, pos = probe[1], pos + probe[2]
    return first, last


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


_MORE, _END, _TORN, _BADSEQ = 0, 1, 2, 3  # batch limit; clean end of data; incomplete or bad record; seq jump


def _read_batch(fd: int, off: int, since: int, expect: int, max_records: int, max_bytes: int,
                out: list[Record], trust: bool = True) -> tuple[int, int, int]:
    """Parse records at `off` into `out`; returns (offset after the last good record, its seq + 1, status).

    Records below `since` are skipped by their header lengths without reading their payload (except the
    last one in the file, which may be torn and is checked so that the offset never lands inside garbage);
    with `trust` False they are CRC-checked too (a damaged length field must not send the walk astray).
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
        if trust and seq < since and seq == expect and off + total < size:
            off, expect = off + total, seq + 1
            continue
        if len(buf) - pos < total:
            buf = os.pread(fd, max(_CHUNK, total), off)
            base, pos = off, 0
            if len(buf) < total:
                return off, expect, _TORN
        mv = memoryview(buf)[pos:pos + total]
        if crc32(mv[8:]) != crc:
            return off, expect, _TORN
        if seq != expect:
            return off, expect, _BADSEQ
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
        self.repairs: list[str] = []
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
        fresh = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, SEGMENT_HEADER.size, first)
        if len(head) < SEGMENT_HEADER.size:
            self._say(f"write log {path}: segment header torn, rewriting it")
            os.ftruncate(self._fd, 0)
            os.write(self._fd, fresh)
        elif head != fresh:
            magic, version, hsize, _ = SEGMENT_HEADER.unpack(head)
            size = os.fstat(self._fd).st_size
            if (magic == SEGMENT_MAGIC and hsize == SEGMENT_HEADER.size and version > FORMAT_VERSION
                    and size > SEGMENT_HEADER.size and _probe(self._fd, SEGMENT_HEADER.size, size)[0] != _VALID):
                raise CorruptLog(f"{path}: write log format version {version}, this mirrorfs writes {FORMAT_VERSION}")
            self._say(f"write log {path}: bad segment header, rewriting it (its records are kept)")
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, fresh, 0)
            finally:
                os.close(fd)
        gaps: list[Gap] = []
        with LogFollower(self.directory, first, max_records=4096) as follower:
            while batch := follower.poll():
                if type(batch[0]) is Gap:
                    gaps.append(batch[0])
            off, expect = follower.position[1] or SEGMENT_HEADER.size, max(follower._expect, first)
        size = os.fstat(self._fd).st_size
        if off < size:
            n, exact = _count_torn(self._fd, off, size)
            seqs = (f"seq {expect}" if n == 1 else f"seqs {expect}-{expect + n - 1}") + ("" if exact else " or more")
            hidden = _hidden_records(self._fd, off, size, expect)
            self._say(f"write log {path}: dropped a torn tail of {size - off} bytes at byte {off}: {seqs}, never "
                      f"complete (the next record gets seq {expect})" + ("" if hidden is None else
                      f"; the bytes dropped held well-formed records for seqs {hidden[0]}-{hidden[1]}: real ones "
                      "if a later segment is missing (a damaged length then looks like a torn tail), else guest "
                      "data"))
            os.ftruncate(self._fd, off)
        self._size, self._last_seq = off, expect - 1
        if gaps:
            self._say(f"write log {path}: damaged in the middle, starting a new segment after seq {expect - 1} "
                      f"so readers resync past it ({'; '.join(map(str, gaps))})")
            self._roll()

    def _say(self, message: str) -> None:
        """What recovery repaired: logged, and kept in `repairs` for whoever opened the log to show."""
        log.warning("%s", message)
        self.repairs.append(message)

    def _new_segment(self, first_seq: int) -> None:
        fd = os.open(self.directory / segment_name(first_seq),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
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
            if n > MAX_PAYLOAD:
                raise ValueError(f"write of {n} bytes: records hold at most {MAX_PAYLOAD}")
        elif kind not in _KINDS or n:
            raise ValueError(f"record kind {kind} with a {n}-byte payload")
        if self._size >= self.segment_bytes:
            self._roll()
        seq = self._last_seq + 1
        try:
            rest = _REST.pack(seq, time.time_ns(), offset, length, kind)
        except struct.error as exc:
            raise ValueError(f"record out of range: offset {offset}, length {length}") from exc
        header = MAGIC + crc32(payload, crc32(rest)).to_bytes(4, "little") + rest
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

    def sync(self) -> None:
        """Make every record appended so far durable, whatever the policy (a clean detach: see tap.attach)."""
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

    Damage anywhere (a torn, zeroed or garbled record, a bad CRC or length, a bad segment header, a missing
    segment, seqs that do not follow) is reported, never skipped in silence and never a dead end: `poll()`
    then returns a one-item batch `[Gap(...)]` naming the exact seqs lost, in its place in seq order, and the
    next poll goes on with the next good record. The good path pays nothing for this: checking the type of
    a batch's first item is all a consumer does.
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
        self._trust = True  # skip records below `since` by their header lengths alone (off after damage there)
        self._scan_at: tuple[tuple[int, int], int] = ((0, 0), 0)  # ((segment, bad offset), scanned up to)

    @property
    def position(self) -> tuple[int, int]:
        """(first seq of the current segment, byte offset in it); (0, 0) before the first segment."""
        return self._seg, self._off

    def _open(self, first: int) -> bool:
        path = self.directory / segment_name(first)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # listed a moment ago: only a human removes segments; the next poll lists again
        head = os.pread(fd, SEGMENT_HEADER.size, 0)
        if len(head) < SEGMENT_HEADER.size and list_segments(self.directory)[-1:] == [first]:
            os.close(fd)
            return False  # the writer is creating it
        try:
            _check_segment_header(head, first, path)
        except (CorruptLog, struct.error) as exc:
            log.warning("write log %s: bad segment header (%s); reading its records anyway", path,
                        str(exc).removeprefix(f"{path}: ") if isinstance(exc, CorruptLog) else "torn")
        self._close_fd()
        self._fd, self._seg, self._off, self._expect = fd, first, SEGMENT_HEADER.size, first
        self._trust = True
        return True

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def poll(self) -> list[Record] | list[Gap]:
        """Records appended since the last poll (empty when there are none yet), or `[Gap]` for lost seqs."""
        out: list[Record] = []
        while True:
            if self._fd < 0:
                segs = list_segments(self.directory)
                if not segs:
                    return out
                start = max((s for s in segs if s <= self.since), default=segs[0])
                if not self._open(start):
                    return out
                if start > self.since:
                    gap = self._gap(self.since, start - 1, start, 0,
                                    f"no segment holds them: the log starts at seq {start}")
                    if gap is not None:
                        return [gap]
            status = self._read(out)
            if status == _MORE or out:
                return out
            nxt = min((s for s in list_segments(self.directory) if s > self._seg), default=0)
            if nxt:
                status = self._read(out)  # the writer has moved on, so this segment is complete: to its end
                if out:
                    return out
            if status == _END:
                if not nxt:
                    return out
                moved, gap = self._next_segment(nxt, None)
            else:
                moved, gap = self._damaged(nxt)
            if gap is not None:
                return [gap]
            if not moved:
                return out

    def _read(self, out: list[Record]) -> int:
        self._off, self._expect, status = _read_batch(
            self._fd, self._off, self.since, self._expect, self.max_records, self.max_bytes, out, self._trust)
        return status

    def _gap(self, first: int, last: int, seg: int, offset: int, why: str) -> Gap | None:
        """A Gap for the seqs this reader was asked for (from `since`), None when that leaves none."""
        first = max(first, self.since)
        if first > last:
            return None
        gap = Gap(first, last, segment_name(seg), offset, why)
        log.warning("%s", gap)
        return gap

    def _next_segment(self, nxt: int, why: str | None) -> tuple[bool, Gap | None]:
        """Go on with segment `nxt`; a Gap for the seqs between where this one ended and where `nxt` starts."""
        seg, off, expect = self._seg, self._off, self._expect
        if not self._open(nxt):
            return False, None
        if nxt < expect:  # overlapping segments: what this reader has passed is not read twice
            log.warning("write log %s starts at seq %d, the previous segment reached seq %d: skipping those",
                        segment_name(nxt), nxt, expect - 1)
            self.since = max(self.since, expect)
            return True, None
        return True, self._gap(expect, nxt - 1, seg, off, why or f"the segment ends at seq {expect - 1} and the "
                               f"next, {segment_name(nxt)}, starts at seq {nxt} (a segment missing or misnamed)")

    def _damaged(self, nxt: int) -> tuple[bool, Gap | None]:
        """At a record the fast path refused: find the next good one (moved, Gap); (False, None) means wait.

        The segment is complete when a later one exists or no writer holds it; in the segment a writer is
        appending to, a record still being written (short or incomplete) is waited for, never skipped: its
        payload is guest data, and a record forged inside it must not make a reader jump ahead.
        """
        fd, off, expect = self._fd, self._off, self._expect
        if self._trust and self._seg < expect <= self.since:
            # `off` was reached by unchecked lengths (the record just before it too, even at since - 1): a damaged
            # one may have put it inside a payload, so the damage may lie before it: walk again, checking each
            # record
            self._trust, self._off, self._expect = False, SEGMENT_HEADER.size, self._seg
            return True, None
        size = os.fstat(fd).st_size
        state, seq, total = _probe(fd, off, size)
        hi = nxt - 1 if nxt else None
        if state == _VALID:  # a good record whose seq does not follow
            if seq < expect:
                log.warning("write log %s: the record at byte %d has seq %d, already passed (expected %d): skipped",
                            segment_name(self._seg), off, seq, expect)
                self._off = off + total
                return True, None
            if hi is None or seq <= hi:
                return True, self._resume(off, seq, off, f"the record at byte {off} has seq {seq}, expected {expect}")
            state = _BAD  # a seq at or past the next segment's start cannot be in this one
        if state in (_SHORT, _INCOMPLETE) and not nxt:
            # a record running past the end of the last segment is the one being written, or one a crash tore:
            # never scan into it (its payload is guest data, and a record forged there must not be taken for a
            # real one); the writer finishes it, or cuts it on start
            return False, None
        found = None
        if state == _BADCRC:  # the header may be right and only the payload hit: try where it says the next is;
            # only seq expect + 1 can be there if it is, any other seq proves the length wrong: then scan
            ok, seq, _ = _candidate(fd, off + total, size, expect, off, hi)
            found = (off + total, seq) if ok > 0 and seq == expect + 1 else None
        if found is None:
            key = (self._seg, off)
            start = max(off + 1, self._scan_at[1]) if self._scan_at[0] == key else off + 1
            found, reached = _find_record(fd, start, size, expect, off, hi)
            self._scan_at = (key, reached)
        what = _DAMAGE[state]
        if found is None:
            if not nxt:
                return False, None  # a torn tail (the writer cuts it on start), or nothing written past it yet
            return self._next_segment(nxt, f"{what} at byte {off}, and no good record after it in the segment")
        return True, self._resume(found[0], found[1], off,
                                  f"{what} at byte {off}; the next good record is at byte {found[0]}")

    def _resume(self, pos: int, seq: int, damage: int, why: str) -> Gap | None:
        gap = self._gap(self._expect, seq - 1, self._seg, damage, why)
        self._off, self._expect = pos, seq
        return gap

    def close(self) -> None:
        self._close_fd()

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(directory: Path, since: int = 1, until: int | None = None) -> Iterator[Record | Gap]:
    """Records with since <= seq <= until, as far as the log reached when the call started (never torn).

    Lost seqs come as a `Gap` item in their place (see LogFollower)."""
    segs = list_segments(directory)
    if not segs:
        return
    end = (segs[-1], os.stat(Path(directory) / segment_name(segs[-1])).st_size)
    with LogFollower(directory, since) as follower:
        while batch := follower.poll():
            if type(batch[0]) is Gap:
                gap = batch[0]
                if until is not None and gap.first_seq > until:
                    return
                yield gap if until is None or gap.last_seq <= until else replace(gap, last_seq=until)
            else:
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
            if type(batch[0]) is not Gap:
                last = batch[-1].seq
    return last


async def follow(directory: Path, since: int = 1, *, interval: float = 0.05) -> AsyncIterator[Record | Gap]:
    """Every record from `since` on, forever, waiting `interval` seconds when caught up; a `Gap` in place of
    lost seqs.

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

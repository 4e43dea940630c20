"""The block-level replica: the disk as the write log makes it, independent of any file system.

It is derived state. `PATH.seq` records the last seq whose effect is durable in PATH (written by
`checkpoint()` after an fsync), and `catch_up()` re-applies every later record after a crash. Re-applying
a record that already reached the file is harmless: records are applied in seq order and each one sets its
range to a fixed content, so every byte ends up as its last writer left it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from tap.writelog import KIND_WRITE, KIND_ZEROES, Gap, LogFollower, Record, last_seq

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".seq")


def _sparse_copy(src: int, dst: int, size: int) -> None:
    """Copy only the data extents of src (holes stay holes; copy_file_range may reflink)."""
    os.ftruncate(dst, size)
    off = 0
    while off < size:
        try:
            start = os.lseek(src, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        pos = start
        while pos < end:
            try:
                n = os.copy_file_range(src, dst, end - pos, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                n = os.pwrite(dst, os.pread(src, min(end - pos, _ZERO_CHUNK), pos), pos)
            if n <= 0:
                raise OSError(errno.EIO, f"copy of the base image stopped at byte {pos}")
            pos += n
        off = end


class BlockReplica:
    """A sparse image file of the disk, updated by `apply` (or by `write`/`zero` from the tap)."""

    def __init__(self, path: Path, size: int, *, base: Path | None = None, base_seq: int = 0,
                 mapped: bool = False) -> None:
        """`base_seq`: the seq `base` is the disk at (a retention checkpoint's, tap.retention); 0 for a base image.
        `mapped`: reads are slices of a shared read-only map of the file (writes stay pwrite; both go through the
        page cache, so a read sees every write before it). For a reader of many small ranges, such as the engine's
        metadata reads: a 4 KiB pread cost several times a slice. Only for a file no other process truncates (a
        shorter file would fault the process on the missing pages); the engine's own replica is one."""
        self.path = Path(path)
        self.size = size
        self.seq_path = _sidecar(self.path)
        self._punch = True
        self._fd = -1
        self._map: mmap.mmap | None = None
        # Without a sidecar a replica made from a base may be a partial copy: make it again.
        new = not self.path.exists() or (base is not None and not self.seq_path.exists())
        if new and base is not None:
            base_size = os.stat(base).st_size
            if base_size != size:
                raise ValueError(f"base image {base} has {base_size} bytes, the disk has {size}")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if new else 0), 0o640)
        try:
            if new:
                if base is not None:
                    src = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        _sparse_copy(src, self._fd, size)
                    finally:
                        os.close(src)
                else:
                    os.ftruncate(self._fd, size)
                self.applied_seq = base_seq if base is not None else 0
                self.checkpoint()
            else:
                have = os.fstat(self._fd).st_size
                if have != size:
                    raise ValueError(f"replica {self.path} has {have} bytes, the disk has {size}")
                self.applied_seq = self._read_sidecar()
            if mapped and size > 0:
                try:
                    self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
                except (OSError, ValueError, OverflowError):
                    self._map = None  # a file system (or address space) that cannot map it: reads stay pread
        except BaseException:
            self.close()
            raise

    def _read_sidecar(self) -> int:
        try:
            return int(self.seq_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside the disk of {self.size} bytes")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        """Punch a hole (the file stays sparse); write zeros where the file system cannot punch."""
        self._check(offset, length)
        if not length:
            return
        if self._punch:
            if _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, f"fallocate(PUNCH_HOLE) on {self.path}: {os.strerror(err)}")
            self._punch = False
        zeros = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            self.write(offset, memoryview(zeros)[:end - offset])
            offset += min(len(zeros), end - offset)

    def data_regions(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """[start, end) pieces of [offset, offset+length) that may hold nonzero bytes: the rest is a hole.

        One SEEK_DATA/SEEK_HOLE pair per region, so a sparse range of any length costs O(1) memory; where the
        file system cannot tell, the whole range."""
        self._check(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    return
                if exc.errno != errno.EINVAL:
                    raise
                yield pos, end  # no SEEK_DATA here: everything may be data
                return
            if start >= end:
                return
            stop = min(os.lseek(self._fd, start, os.SEEK_HOLE), end)
            yield start, stop
            pos = stop

    def apply(self, record: Record) -> bool:
        """Apply one log record; False (and nothing done) when its seq is already applied."""
        if record.seq <= self.applied_seq:
            return False
        if record.kind == KIND_WRITE:
            self.write(record.offset, record.payload)
        elif record.kind == KIND_ZEROES:
            self.zero(record.offset, record.length)
        else:  # FLUSH; TRIM leaves the range unspecified, and QEMU drops discards during a mirror anyway
            self._check(record.offset, record.length)
        self.applied_seq = record.seq
        return True

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if self._map is not None:
            return self._map[offset:offset + length]
        parts = []
        while length:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                raise OSError(errno.EIO, f"{self.path} is shorter than {self.size} bytes")
            parts.append(chunk)
            offset, length = offset + len(chunk), length - len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def checkpoint(self) -> None:
        """Make the image durable, then record applied_seq in the sidecar (tmp + rename)."""
        os.fsync(self._fd)
        tmp = self.seq_path.with_name(self.seq_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, f"{self.applied_seq}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.seq_path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def catch_up(self, log_dir: Path, until: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 on_gap: Callable[[Gap], None] | None = None) -> int:
        """Apply every record after applied_seq (up to `until`, default: the log's end now); returns applied_seq.

        Reads the log in bounded batches; `progress(applied_seq, target_seq)` is called after each one.
        Seqs the log lost (a `Gap`, logged by the reader) are passed to `on_gap` and skipped: their writes
        cannot be applied, and waiting for them would stop the replica for good.
        """
        target = last_seq(log_dir) if until is None else until
        if target <= self.applied_seq:
            return self.applied_seq
        with LogFollower(log_dir, self.applied_seq + 1) as follower:
            while self.applied_seq < target and (batch := follower.poll()):
                if type(batch[0]) is Gap:
                    if batch[0].first_seq > target:
                        break
                    if on_gap is not None:
                        on_gap(batch[0])
                    self.applied_seq = min(batch[0].last_seq, target)
                    continue
                for rec in batch:
                    if rec.seq > target:
                        break
                    self.apply(rec)
                if progress is not None:
                    progress(self.applied_seq, target)
        return self.applied_seq

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlockReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_replica(log_dir: Path, out: Path, size: int, *, base: Path | None = None, base_seq: int = 0,
                  until: int | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  on_gap: Callable[[Gap], None] | None = None) -> int:
    """Write the disk as the log makes it at seq `until` (default: the log's end now) to `out`.

    Built beside `out` and renamed into place, with its sidecar, so `out` is a BlockReplica that a later
    `catch_up` can continue. `base_seq`: the seq `base` is the disk at (a checkpoint). Returns the last applied seq.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp_seq = _sidecar(tmp)
    for p in (tmp, tmp_seq):
        p.unlink(missing_ok=True)
    try:
        with BlockReplica(tmp, size, base=base, base_seq=base_seq) as replica:
            seq = replica.catch_up(log_dir, until, progress, on_gap)
            replica.checkpoint()
        _sidecar(out).unlink(missing_ok=True)  # a crash before the last rename leaves out without a sidecar
        os.replace(tmp, out)
        os.replace(tmp_seq, _sidecar(out))
    finally:
        for p in (tmp, tmp_seq):
            p.unlink(missing_ok=True)
    return seq

"""Is the base image the disk? Compare it, while the guest runs, with QEMU's own read-only NBD export of the disk.

An attach with `--sync none` trusts its base: the replica (and the engine's tree) start from it, and the log adds
only what is written from now on. This module checks that trust without stopping the guest:

- QEMU exports the drive's node read-only over NBD (`nbd-server-start` on a unix socket, `block-export-add`);
  `NBDReader` is the small client that reads it.
- The mirror job is already running when the comparison starts, so every write the guest makes meanwhile is in
  the log and the replica (`TrackingBackend` also notes the ranges it wrote). The replica is compared, not the
  base file: base plus the log so far is what the disk should hold.
- A byte range that differs is re-read (replica, export, replica): equal on either side means a write was in
  flight. A differing sector that a logged write covers is not the base's fault either: the log sets it. What
  differs, uncovered, on every read for CONFIRM_S is the base's: a mismatch, or with `repair` the export's bytes
  are copied into the replica (and the repaired base), unless a write lands there first.

The ranges to compare (what the engine trusts) come from the caller: tap knows no file systems.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractContextManager, aclosing, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tap import nbd
from tap.qmp_client import QMPClient, QMPError
from tap.replica import BlockReplica
from tap.server import TapBackend

log = logging.getLogger("mirrorfs.verify")

SECTOR = 512
PIECE = 4096  # first-pass differences are kept at this granularity
READ_MAX = 1 << 20  # bytes per NBD read
MERGE_GAP = 64 << 10  # regions closer than this are read in one request
CONFIRM_S = {"exact": 1.0, "async": 5.0}  # how long a difference must last, uncovered, to be the base's
SETTLE_MAX_S = 60.0
REFUSE_LOOKS = 16  # differences followed at once when one is enough (no repair)
EXPORT_NAME = "mirrorfs-verify"

Region = tuple[int, int, str]  # (disk offset, length, what)


class VerifyError(Exception):
    """The check could not run (QEMU refused the export, the connection broke); the message names the fix."""


# ---------------------------------------------------------------- writes seen by the tap

class WriteTracker:
    """Merged byte ranges the mirror job wrote since the attach began, and a wake-up on each new write.

    `add` is called from the connections' threads (under the backend's lock), the rest from the trio thread:
    ranges change under `_lock`, and the wake-up crosses into trio with the run's token."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.writes = 0
        self._lock = threading.Lock()
        self._waiter: tuple[trio.Event, trio.lowlevel.TrioToken, int] | None = None
        self._recent: list[tuple[int, int]] = []  # writes since mark()

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        with self._lock:
            self.writes += 1
            self._recent.append((offset, length))
            start, end = offset, offset + length
            lo = bisect.bisect_left(self._ends, start)  # first range that ends at or after start
            hi = bisect.bisect_right(self._starts, end)  # ranges from lo to hi-1 touch [start, end]
            if lo < hi:
                start, end = min(start, self._starts[lo]), max(end, self._ends[hi - 1])
            self._starts[lo:hi], self._ends[lo:hi] = [start], [end]
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            event, token, thread = waiter
            if threading.get_ident() == thread:
                event.set()
            else:
                try:
                    token.run_sync_soon(event.set)
                except trio.RunFinishedError:
                    pass

    def covers(self, offset: int, length: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self._starts, offset) - 1
            return i >= 0 and self._ends[i] >= offset + length

    def mark(self) -> None:
        with self._lock:
            self._recent.clear()

    def written_since_mark(self, offset: int, length: int) -> bool:
        with self._lock:
            return any(o < offset + length and offset < o + n for o, n in self._recent)

    async def wait(self, timeout: float) -> bool:
        """True once a new write arrives, False after `timeout` seconds without one."""
        event = trio.Event()
        with self._lock:
            self._waiter = (event, trio.lowlevel.current_trio_token(), threading.get_ident())
        with trio.move_on_after(timeout):
            await event.wait()
            return True
        with self._lock:
            if self._waiter is not None and self._waiter[0] is event:
                self._waiter = None
        return False


@dataclass
class TrackingBackend(TapBackend):
    """The tap's backend, also noting each written range in `tracker` (while there is one)."""

    tracker: WriteTracker | None = field(default=None)

    def log_write(self, offset: int, data: bytes | memoryview) -> int:
        with self.lock:  # the record and its note together: a repair checks both under this lock
            seq = super().log_write(offset, data)
            if (tracker := self.tracker) is not None:  # set to None by the trio thread when the check ends
                tracker.add(offset, len(data))
        return seq

    def zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        with self.lock:
            super().zeroes(offset, length)
            if (tracker := self.tracker) is not None:
                tracker.add(offset, length)
        if fua:
            self.sync()


# ---------------------------------------------------------------- a read-only NBD client

class NBDReader:
    """Fixed-newstyle NBD client on a unix socket: OPT_GO, then simple-reply READs, one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._handle = 0
        self._asked: dict[int, tuple[int, int]] = {}  # handle -> (offset, length) of READs not answered yet
        self.size = 0

    async def _recv(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = await self._stream.receive_some(max(1 << 16, n - len(self._buf)))
            if not data:
                raise VerifyError("QEMU closed the verification NBD connection")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def handshake(self, name: str) -> None:
        magic, opt, _flags = struct.unpack(">QQH", await self._recv(18))
        if magic != nbd.NBDMAGIC or opt != nbd.IHAVEOPT:
            raise VerifyError("the verification socket does not speak fixed-newstyle NBD")
        await self._stream.send_all(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        await self._stream.send_all(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(data)) + data)
        while True:
            _magic, _opt, rep, length = struct.unpack(">QIII", await self._recv(20))
            body = await self._recv(length)
            if rep == nbd.REP_ACK:
                break
            if rep == nbd.REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == nbd.INFO_EXPORT:
                self.size = struct.unpack(">Q", body[2:10])[0]
            elif rep & (1 << 31):
                raise VerifyError(f"QEMU's NBD server refused export {name!r}: {body[4:].decode(errors='replace')}")

    async def _request(self, offset: int, length: int) -> int:
        self._handle += 1
        self._asked[self._handle] = (offset, length)
        await self._stream.send_all(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, self._handle,
                                                offset, length))
        return self._handle

    async def _reply(self) -> tuple[int, bytes]:
        magic, error, handle = struct.unpack(">IIQ", await self._recv(16))
        if magic != nbd.SIMPLE_REPLY_MAGIC or handle not in self._asked:
            raise VerifyError("unexpected reply on the verification NBD connection")
        offset, length = self._asked.pop(handle)
        if error:
            raise VerifyError(f"QEMU could not read bytes {offset}-{offset + length} of the disk: "
                              f"{os.strerror(error)}")
        return handle, await self._recv(length)

    async def read(self, offset: int, length: int) -> bytes:
        want = await self._request(offset, length)
        handle, data = await self._reply()
        assert handle == want
        return data

    async def read_ahead(self, ranges: Iterable[tuple[int, int]], window: int = 8) -> AsyncIterator[bytes]:
        """The bytes of each (offset, length) in order, with up to `window` READs in flight (QEMU may answer
        them in any order)."""
        it = iter(ranges)
        order: deque[int] = deque()
        done: dict[int, bytes] = {}
        while True:
            while len(order) < window and (r := next(it, None)) is not None:
                order.append(await self._request(*r))
            if not order:
                return
            while order[0] not in done:
                handle, data = await self._reply()
                done[handle] = data
            yield done.pop(order.popleft())


@asynccontextmanager
async def qemu_export(qmp: QMPClient, node: str, sock: Path, *, server: Path | None = None,
                      tag: str = "") -> AsyncIterator[NBDReader]:
    """A read-only NBD export of `node` by QEMU itself, connected; both removed at the end.

    Without `server`, QEMU's NBD server is started on `sock` (and stopped again); with it, the export is added to
    the server the user already runs there (QEMU runs at most one)."""
    export_id = f"{EXPORT_NAME}-{tag}" if tag else EXPORT_NAME
    started = False
    if server is None:
        sock.unlink(missing_ok=True)
        try:
            await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        except QMPError as exc:
            hint = ("; it runs one already: give its unix socket with --verify-nbd PATH" if "already" in exc.desc
                    else "")
            raise VerifyError(f"QEMU cannot start the NBD server that verifies the base: {exc.desc}{hint}, "
                              "or attach with --sync full (no base)") from None
        started = True
    try:
        try:
            await qmp.execute("block-export-add", {"type": "nbd", "id": export_id, "node-name": node,
                                                   "name": export_id, "writable": False})
        except QMPError as exc:
            raise VerifyError(f"QEMU cannot export {node} read-only to verify the base: {exc.desc}; attach with "
                              "--sync full (no base)") from None
        try:
            try:
                stream = await trio.open_unix_socket(str(server or sock))
            except OSError as exc:
                raise VerifyError(f"cannot connect to QEMU's NBD server at {server or sock}: {exc.strerror}") from None
            async with stream:
                reader = NBDReader(stream)
                with trio.fail_after(30):
                    await reader.handshake(export_id)
                yield reader
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await qmp.execute("block-export-del", {"id": export_id, "mode": "hard"})
                except (QMPError, OSError) as exc:
                    log.debug("block-export-del %s: %s", export_id, exc)
    finally:
        if started:
            with trio.CancelScope(shield=True):
                try:
                    await qmp.execute("nbd-server-stop")
                except (QMPError, OSError) as exc:
                    log.debug("nbd-server-stop: %s", exc)
                sock.unlink(missing_ok=True)


# ---------------------------------------------------------------- the comparison

@dataclass
class Outcome:
    compared: int = 0  # bytes
    regions: int = 0
    mismatches: list[Region] = field(default_factory=list)  # the base's, in disk order (the first only unless repair)
    repaired: int = 0  # bytes copied into the replica and the repaired base
    carried: int = 0  # differing bytes that writes during the check set (the log carries them)
    writes_during: int = 0
    seconds: float = 0.0


def _batches(regions: Sequence[Region]) -> Iterable[tuple[int, int, list[Region]]]:
    """(start, end, regions) of reads of at most READ_MAX bytes; regions split to fit, near ones merged."""
    pieces: list[Region] = []
    for off, length, what in regions:
        for p in range(off, off + length, READ_MAX):
            pieces.append((p, min(READ_MAX, off + length - p), what))
    pieces.sort()
    cur: list[Region] = []
    start = end = 0
    for off, length, what in pieces:
        if cur and (off > end + MERGE_GAP or max(end, off + length) - start > READ_MAX):
            yield start, end, cur
            cur = []
        if not cur:
            start, end = off, off + length
        cur.append((off, length, what))
        end = max(end, off + length)
    if cur:
        yield start, end, cur


def _diff_runs(a: bytes, b: bytes, base: int, step: int) -> list[tuple[int, int]]:
    """(disk offset, length) runs of `step`-sized pieces where a and b differ."""
    runs: list[tuple[int, int]] = []
    ma, mb = memoryview(a), memoryview(b)
    first = (base // step) * step
    for p in range(first, base + len(a), step):
        lo, hi = max(p, base) - base, min(p + step, base + len(a)) - base
        if ma[lo:hi] != mb[lo:hi]:
            if runs and runs[-1][0] + runs[-1][1] == lo + base:
                runs[-1] = (runs[-1][0], hi + base - runs[-1][0])
            else:
                runs.append((lo + base, hi - lo))
    return runs


class Verifier:
    """One comparison of the replica (base + log so far) against the disk, with `repair` optionally."""

    def __init__(self, reader: NBDReader, replica: BlockReplica, tracker: WriteTracker, *, mode: str = "exact",
                 repair_into: BlockReplica | None = None, repair: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 lock: AbstractContextManager[Any] | None = None,
                 apply: Callable[[int, bytes], None] | None = None) -> None:
        """`lock`: the backend's, held while a repair checks for new writes and writes (connections write from
        their own threads). `apply(offset, data)` writes a repair (default: into the replica; a resync after an
        unclean stop logs it as a record, so the engine sees it)."""
        self.reader, self.replica, self.tracker = reader, replica, tracker
        self.confirm_s = CONFIRM_S.get(mode, CONFIRM_S["async"])
        self.repair, self.repair_into = repair, repair_into
        self.lock = lock if lock is not None else nullcontext()
        self.apply = apply if apply is not None else replica.write
        self.progress = progress
        self.outcome = Outcome()

    async def run(self, regions: Sequence[Region]) -> Outcome:
        start = trio.current_time()
        writes0 = self.tracker.writes
        total = sum(r[1] for r in regions)
        suspects: list[Region] = []
        done = 0
        batches = list(_batches(regions))
        async with aclosing(self.reader.read_ahead((lo, hi - lo) for lo, hi, _ in batches)) as stream:
            for lo, hi, members in batches:
                disk = await anext(stream)
                mine = self.replica.read(lo, hi - lo)
                if disk != mine:
                    for off, length, what in members:
                        a, b = disk[off - lo: off - lo + length], mine[off - lo: off - lo + length]
                        suspects += [(o, n, what) for o, n in _diff_runs(a, b, off, PIECE)]
                done += sum(m[1] for m in members)
                self.outcome.compared = done
                if self.progress is not None:
                    self.progress(done, total)
        self.outcome.regions = len(regions)
        await self._settle(sorted(set(suspects)))
        self.outcome.mismatches.sort()
        self.outcome.writes_during = self.tracker.writes - writes0
        self.outcome.seconds = trio.current_time() - start
        return self.outcome

    def _uncovered(self, off: int, length: int, disk: bytes, mine: bytes) -> list[tuple[int, int]]:
        """Sector runs that differ and that no logged write covers; the covered ones are counted as carried."""
        out = []
        for o, n in _diff_runs(disk, mine, off, SECTOR):
            for s in range(o, o + n, SECTOR):
                ln = min(SECTOR, o + n - s)
                if self.tracker.covers(s, ln):
                    self.outcome.carried += ln
                elif out and out[-1][0] + out[-1][1] == s:
                    out[-1] = (out[-1][0], out[-1][1] + ln)
                else:
                    out.append((s, ln))
        return out

    async def _settle(self, suspects: list[Region]) -> None:
        """Re-read each suspect until it agrees, a write covers it, or it has differed for confirm_s: the base's."""
        first_seen: dict[int, float] = {}
        pending = suspects
        deadline = trio.current_time() + SETTLE_MAX_S
        while pending:
            now = trio.current_time()
            still: list[Region] = []
            # refusing needs one lasting difference: look at the first few only, the next ones if those settle
            active, rest = (pending, []) if self.repair else (pending[:REFUSE_LOOKS], pending[REFUSE_LOOKS:])
            for off, length, what in active:
                self.tracker.mark()
                before = self.replica.read(off, length)
                disk = await self.reader.read(off, length)
                after = self.replica.read(off, length)
                if disk == before or disk == after:
                    continue
                for o, n in self._uncovered(off, length, disk, after):
                    key = (o, n, what)
                    seen = first_seen.setdefault(o, now)
                    if now - seen >= self.confirm_s or now >= deadline:
                        if not await self._confirmed(key, disk[o - off: o - off + n]):
                            still.append(key)
                        if self.outcome.mismatches and not self.repair:
                            return  # one real difference is enough to refuse
                    else:
                        still.append(key)
            pending = still + rest
            if pending:
                await self.tracker.wait(min(0.25, self.confirm_s / 4))

    async def _confirmed(self, region: Region, disk: bytes) -> bool:
        """A lasting difference: record it; with repair, copy the disk's bytes in (False: look again, a write
        landed on it meanwhile)."""
        off, length, what = region
        if not self.repair:
            self.outcome.mismatches.append(region)
            return True
        with self.lock:
            if self.tracker.written_since_mark(off, length):
                return False  # a write arrived since the read: its bytes are in the replica, what is left is rechecked
            self.apply(off, disk)
        if self.repair_into is not None:
            self.repair_into.write(off, disk)
        self.outcome.mismatches.append(region)
        self.outcome.repaired += length
        return True


def repaired_base(base: Path, out: Path, size: int) -> BlockReplica:
    """A copy of the base (sparse, reflinked where the file system can) to write repairs into."""
    out.unlink(missing_ok=True)
    out.with_name(out.name + ".seq").unlink(missing_ok=True)
    try:
        return BlockReplica(out, size, base=base)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise VerifyError(f"no space for the repaired base {out}: free {size} bytes or use --sync full") from None
        raise

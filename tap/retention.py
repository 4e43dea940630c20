"""Retention (issue 14): the oldest write-log segments folded into a checkpoint and removed, online.

A checkpoint is the disk as the log made it at seq S (the previous checkpoint, or the base, with the records up
to S applied) plus, when the caller can make one, its pre-index (`mirrorfs index`), so replays and `engine_at`
start there. Files in DIR/checkpoint/, named by S (20 digits):

  S.img, S.img.seq   the image and its seq (a tap.replica BlockReplica, built beside and renamed into place)
  S.mfsidx           its pre-index (optional: a disk with no ext file system has none)
  S.json             written last (fsync + rename): the checkpoint exists from here on

Order, so a crash at any step leaves a usable state: image and index durable → S.json durable → the segments
holding only seqs <= S removed (oldest first, the directory fsynced) → the older checkpoints removed. Before
S.json the old checkpoint and every segment are still there (the orphans are removed by the next fold); after
it, a segment left over is simply not read (readers start at S + 1).

Only whole segments are folded, and never the one being written. The fold runs in a child process of the attach
(its CPU never sits on the ack path), started when `plan` says so: segments older than `keep_s`, beyond
`keep_bytes`, or the oldest while free space on the state's file system is under `min_free` — the last even past
the live engine's reading position (it then reports the seqs it lost as an error event), so a full state disk
never stalls the guest. Otherwise a segment the engine has not finished reading is never removed, nor what other
readers (cat, restore, mount, replica, a replay that does not follow) started from: they hold LOCK shared while
they read (`reading`), and a fold that cannot take it leaves the removal to a later fold.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tap.replica import BlockReplica, build_replica
from tap.state import make_dir
from tap.writelog import HEADER, MAGIC, SEGMENT_HEADER, Gap, list_segments, read_records, segment_name

log = logging.getLogger("mirrorfs.retention")

CHECKPOINT_DIR = "checkpoint"
READING = "reading.json"  # the live engine's reading position (the first seq of the segment it reads)


class RetentionError(Exception):
    """A fold cannot be made; the message names the cause and the fix."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The disk at `seq` (the record's time `time_ns`): `image`, with `index` when one could be made."""

    seq: int
    time_ns: int
    image: Path
    index: Path | None
    made: float

    def describe(self) -> str:
        import datetime as dt
        when = dt.datetime.fromtimestamp(self.time_ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")
        return f"seq {self.seq} ({when.replace('+00:00', 'Z')})"


def _name(seq: int) -> str:
    return f"{seq:020d}"


def current(state_path: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a state directory (None: the log still starts at seq 1)."""
    d = Path(state_path) / CHECKPOINT_DIR
    try:
        names = sorted((n for n in os.listdir(d) if n.endswith(".json") and n[:20].isdigit() and len(n) == 25),
                       reverse=True)
    except FileNotFoundError:
        return None
    for n in names:
        try:
            meta = json.loads((d / n).read_text())
            seq, time_ns = int(meta["seq"]), int(meta["time_ns"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("checkpoint %s is unreadable: skipped", d / n)
            continue
        image = d / f"{_name(seq)}.img"
        index = d / f"{_name(seq)}.mfsidx" if meta.get("index") else None
        if image.is_file():
            return Checkpoint(seq, time_ns, image, index, float(meta.get("made", 0)))
    return None


def start(state_path: Path, base: Path | None) -> tuple[Path | None, int]:
    """(image, seq) a rebuild of the disk starts from: the newest checkpoint, or the base (or zeros) at seq 0."""
    ck = current(state_path)
    return (ck.image, ck.seq) if ck is not None else (base, 0)


def open_replica(state_path: Path, path: Path, size: int, base: Path | None) -> BlockReplica:
    """The state's replica (tap.replica), made from the newest checkpoint (or the base) when it is missing or
    older than the checkpoint (its records are gone from the log), then caught up with the log."""
    image, seq = start(state_path, base)
    replica = BlockReplica(path, size, base=image, base_seq=seq)
    if replica.applied_seq < seq:
        replica.close()
        for p in (path, path.with_name(path.name + ".seq")):
            Path(p).unlink(missing_ok=True)
        replica = BlockReplica(path, size, base=image, base_seq=seq)
    try:
        replica.catch_up(Path(state_path) / "log")
    except BaseException:
        replica.close()
        raise
    return replica


# -- when to fold

@dataclass(frozen=True, slots=True)
class Policy:
    """--retain, --retain-size and the free-space floor (a fraction of the file system, and bytes: the larger)."""

    keep_s: float | None = None
    keep_bytes: int | None = None
    min_free_fraction: float = 0.05
    min_free_bytes: int = 1 << 30


@dataclass(frozen=True, slots=True)
class Segment:
    first: int     # its first seq
    nbytes: int
    end_ns: int    # the first record time of the next segment: no record of this one is later


def plan(segments: list[Segment], policy: Policy, *, now_ns: int, free: int, total: int, reader: int | None,
         floor: int = 0) -> tuple[int, str] | None:
    """(S, why) to fold the log up to seq S, or None. `segments`, oldest first, end with the one being written
    (never folded; it tells where the one before it ends). `reader`: the first seq of the segment the live
    engine reads (None: no engine to wait for); `floor`: no fold ends before it (a --sync full copy is not a
    disk yet)."""
    need = max(policy.min_free_fraction * total, policy.min_free_bytes)
    logged = sum(s.nbytes for s in segments)
    upto, why, freed = None, "", 0
    for seg, nxt in zip(segments, segments[1:], strict=False):
        last = nxt.first - 1
        old = policy.keep_s is not None and seg.end_ns < now_ns - policy.keep_s * 1e9
        big = policy.keep_bytes is not None and logged - freed > policy.keep_bytes
        short = free + freed < need
        if not (old or big or short):
            break
        if reader is not None and last >= reader and not short:
            break  # the engine has not finished reading it
        upto, freed = last, freed + seg.nbytes
        why = "free space" if short else "--retain" if old else "--retain-size"
    if upto is None or upto < floor:
        return None
    return upto, why


class Segments:
    """The complete segments of a log directory, with their sizes and end times, read once each (a complete
    segment never changes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._known: dict[int, tuple[int, int]] = {}

    def _first_time(self, first: int) -> int | None:
        try:
            with open(self.directory / segment_name(first), "rb") as f:
                f.seek(SEGMENT_HEADER.size)
                hdr = f.read(HEADER.size)
        except OSError:
            return None
        if len(hdr) < HEADER.size or hdr[:4] != MAGIC:
            return None  # being written, or damaged: not folded on a guess
        return HEADER.unpack(hdr)[3]

    def complete(self) -> list[Segment]:
        """The complete segments, oldest first, then the one being written (`plan` never folds that one)."""
        firsts = list_segments(self.directory)
        out: list[Segment] = []
        for a, b in zip(firsts, firsts[1:], strict=False):
            if a not in self._known:
                t = self._first_time(b)
                try:
                    size = os.stat(self.directory / segment_name(a)).st_size
                except FileNotFoundError:
                    break
                if t is None:
                    break  # the next one is being created: ask again later (it counts as the writer's now)
                self._known[a] = (size, t)
            size, t = self._known[a]
            out.append(Segment(a, size, t))
        for k in [k for k in self._known if k not in firsts]:
            del self._known[k]
        if out:
            writer = firsts[len(out)]
            try:
                size = os.stat(self.directory / segment_name(writer)).st_size
            except FileNotFoundError:
                size = 0
            out.append(Segment(writer, size, 2**63))
        return out


def plan_log(directory: Path, segs: Segments, policy: Policy, *, now_ns: int, reader: int | None,
             floor: int = 0) -> tuple[int, str] | None:
    """`plan` over a log directory (free space of its file system from statvfs)."""
    listed = segs.complete()
    if len(listed) < 2:
        return None
    st = os.statvfs(directory)
    return plan(listed, policy, now_ns=now_ns, free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize,
                reader=reader, floor=floor)


def reader_position(state_path: Path) -> int:
    """The first seq of the segment the live engine reads (0: none yet, so nothing is folded)."""
    try:
        return int(json.loads((Path(state_path) / READING).read_text())["segment"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# -- the fold

LOCK = "retain.lock"  # readers of a checkpoint and the log after it hold it shared; a fold removes only with it


@contextmanager
def reading(state_path: Path) -> Iterator[None]:
    """Hold while reading the checkpoint and the log after it (cat, restore, mount --at, replica, replay): a fold
    meanwhile leaves the segments and the checkpoint it replaces for a later fold, unless free space is short.
    The live engine needs none of this: retention follows its reading position. Without write access to the
    state directory and no lock file yet, nothing is held (no fold has run either)."""
    try:
        fd = os.open(Path(state_path) / LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


IndexFn = Callable[[Path, Path], None]  # (image, index out): raise ValueError when the image has nothing to index


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fold(state_path: Path, log_dir: Path, size: int, until: int, *, base: Path | None = None,
         index: IndexFn | None = None, progress: Callable[[int, int], None] | None = None,
         on_gap: Callable[[Gap], None] | None = None, steps: Callable[[str], None] | None = None,
         force: bool = False) -> Checkpoint:
    """Fold the log up to seq `until` (the last seq of a segment) into a new checkpoint, then remove what it
    replaces, unless a reader (`reading`) uses it: then a later fold does (`force`: free space is short, remove it
    anyway). `steps(name)` is called before each step (tests crash there)."""
    step = steps or (lambda _name: None)
    state_path, log_dir = Path(state_path), Path(log_dir)
    d = state_path / CHECKPOINT_DIR
    make_dir(d, what="checkpoint directory")
    prev = current(state_path)
    if prev is not None and until <= prev.seq:
        raise RetentionError(f"the log is already folded up to seq {prev.seq}")
    firsts = list_segments(log_dir)
    if until + 1 not in firsts:
        raise RetentionError(f"seq {until} is not the end of a write-log segment (segments start at "
                             f"{', '.join(map(str, firsts[-5:]))}): only whole segments are folded")
    rec = next((r for r in read_records(log_dir, until, until) if type(r) is not Gap), None)
    if rec is None:
        raise RetentionError(f"seq {until} is not in the write log (lost, or folded already)")
    _remove_orphans(d, keep=prev.seq if prev else None, older=False)
    image = d / f"{_name(until)}.img"
    step("image")
    src, src_seq = (prev.image, prev.seq) if prev is not None else (base, 0)
    build_replica(log_dir, image, size, base=src, base_seq=src_seq, until=until, progress=progress, on_gap=on_gap)
    idx: Path | None = None
    if index is not None:
        step("index")
        idx = d / f"{_name(until)}.mfsidx"
        try:
            index(image, idx)
        except ValueError as exc:  # no ext file system on it (yet): replays scan the image instead
            log.info("checkpoint %d: no index (%s)", until, exc)
            idx = None
    step("commit")
    _write_durable(d / f"{_name(until)}.json", json.dumps(
        {"seq": until, "time_ns": rec.time_ns, "index": idx is not None, "made": time.time()}) + "\n")
    step("segments")
    lock = os.open(state_path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        if free or force:
            if not free:
                log.warning("free space is short: removing history a reader (cat, restore, replay, replica) uses")
            _drop(log_dir, firsts, until, d, step)
        else:  # a reader started from what this fold replaces: a later fold removes it
            log.info("checkpoint %d made; a reader still uses the older history, kept until a later fold", until)
    finally:
        os.close(lock)
    ck = current(state_path)
    assert ck is not None and ck.seq == until
    return ck


def _drop(log_dir: Path, firsts: list[int], until: int, d: Path, step: Callable[[str], None]) -> None:
    """Remove the segments holding only seqs <= until, oldest first, then every other checkpoint's files."""
    removed = 0
    for i, first in enumerate(firsts):
        nxt = firsts[i + 1] if i + 1 < len(firsts) else None
        if nxt is None or nxt - 1 > until:
            break
        (log_dir / segment_name(first)).unlink(missing_ok=True)
        removed += 1
    if removed:
        _fsync_dir(log_dir)
    step("old")
    _remove_orphans(d, keep=until, older=True)


def _remove_orphans(d: Path, keep: int | None, *, older: bool) -> None:
    """What a fold that did not reach its S.json left (files of a later seq than `keep`, temporaries), and with
    `older` the older checkpoints too: every file of the checkpoint directory but checkpoint `keep`'s."""
    mine = _name(keep) if keep is not None else None
    for n in os.listdir(d):
        if mine is not None and n[:20] == mine and not n.startswith("."):
            continue
        if not older and n[:20].isdigit() and (mine is None or n[:20] < mine):
            continue  # an older checkpoint: a reader may use it; removed under the lock
        p = d / n
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

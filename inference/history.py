"""History (issue 14): every version of a path from the event log, and the engine as of any moment of the write log.

- `HistoryIndex` answers "every version of PATH" from events.jsonl without re-running the engine: a SQLite index
  (state dir `history.db`) of each event's path, old path, file system, inode and byte offset, brought up to date
  incrementally from where it stopped (a rewritten events.jsonl is indexed again). A path's versions are the events
  of every inode life that held the name at some time, followed across renames: an inode number is reused, so a
  life runs from its create (mkdir, symlink, mknod) to the delete that drops its last link.
- `engine_at` replays the write log from the base up to a seq (or a time) and hands back the engine there: its
  replica holds the bytes of files since deleted or overwritten, read through inference/view.py as the view
  would have read them then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from inference.events import Mutation

log = logging.getLogger("mirrorfs.history")

BIRTHS = ("create", "mkdir", "symlink", "mknod")
SCHEMA = 3  # 3: paths as 64-bit keys (_key), checked against the event when read
BATCH = 1 << 22  # bytes of events.jsonl indexed per transaction


class HistoryIndex:
    """The event log's index by path and inode. `path` None: in memory only (a state dir we may not write)."""

    def __init__(self, events: Path, path: Path | None) -> None:
        self.events = Path(events)
        self.db = self._open(path)

    def _open(self, path: Path | None) -> sqlite3.Connection:
        if path is not None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                os.close(fd)
                db = sqlite3.connect(path, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                return self._schema(db)
            except (OSError, sqlite3.Error):
                pass  # read-only access to the state dir: index in memory for this call
        return self._schema(sqlite3.connect(":memory:", isolation_level=None))

    @staticmethod
    def _schema(db: sqlite3.Connection) -> sqlite3.Connection:
        db.execute("PRAGMA synchronous=OFF")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA:
            db.executescript("""
                DROP TABLE IF EXISTS ev; DROP TABLE IF EXISTS meta;
                CREATE TABLE ev (off INTEGER PRIMARY KEY, len INTEGER, fs TEXT, ino INTEGER, path INTEGER,
                                 old INTEGER);
                CREATE INDEX ev_path ON ev (path);
                CREATE INDEX ev_old ON ev (old) WHERE old IS NOT NULL;
                CREATE INDEX ev_ino ON ev (fs, ino);
                CREATE TABLE meta (k TEXT PRIMARY KEY, v);
            """)
            db.execute(f"PRAGMA user_version={SCHEMA}")
        return db

    def _meta(self, key: str, default=None):
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return default if row is None else row[0]

    def update(self) -> int:
        """Index what was appended since the last call; returns the number of events indexed now."""
        try:
            f = open(self.events, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return 0
        with f:
            size = os.fstat(f.fileno()).st_size
            done, last = self._meta("offset", 0), self._meta("last", b"")
            if done:  # still the file we indexed? (a replay truncates and rewrites it)
                f.seek(max(done - len(last), 0))
                if done > size or f.read(len(last)) != last:
                    self.db.executescript("DELETE FROM ev; DELETE FROM meta;")
                    done, last = 0, b""
            f.seek(done)
            count = 0
            while done < size:
                chunk = f.read(min(BATCH, size - done))
                end = chunk.rfind(b"\n") + 1
                if end == 0:
                    if len(chunk) < BATCH:
                        break  # a torn last line: the writer is still at it
                    chunk += f.readline()  # one line longer than a batch
                    end = len(chunk)
                rows = []
                pos = 0
                while pos < end:
                    nl = chunk.index(b"\n", pos)
                    line = chunk[pos:nl]
                    if line.strip():
                        fs, ino, path, old = _fields(line)
                        rows.append((done + pos, nl - pos, fs, ino, _key(path), None if old is None else _key(old)))
                        last = line + b"\n"
                    pos = nl + 1
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR REPLACE INTO ev VALUES (?,?,?,?,?,?)", rows)
                done += end
                f.seek(done)
                self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", [("offset", done), ("last", last)])
                self.db.execute("COMMIT")
                count += len(rows)
        return count

    def versions(self, path: str, fs: str | None = None) -> list[Mutation]:
        """Every event of every inode life that was at `path` (in `fs`, or any file system), oldest first."""
        key = _key(_b(path))
        hits = self.db.execute("SELECT off, len, fs, ino FROM ev WHERE path=? UNION "
                               "SELECT off, len, fs, ino FROM ev WHERE old=?", (key, key)).fetchall()
        wanted: dict[tuple[str, int], list[int]] = {}
        out: dict[int, Mutation] = {}
        with open(self.events, "rb") as log:
            for off, n, f, ino in hits:
                ev = _read(log, off, n)
                if (fs is None or f == fs) and path in (ev.path, ev.old_path):  # not another path's key
                    wanted.setdefault((f, ino), []).append(off)
            for (f, ino), offs in wanted.items():
                rows = self.db.execute("SELECT off, len FROM ev WHERE fs=? AND ino=? ORDER BY off", (f, ino)).fetchall()
                events = [(off, _read(log, off, n)) for off, n in rows]
                for life in _lives(events):
                    if any(off in offs for off, _ in life):
                        out.update(life)
        return [out[k] for k in sorted(out)]

    def close(self) -> None:
        self.db.close()


_STR = rb'"((?:[^"\\]|\\.)*)"'
_FS = re.compile(rb'"fs":' + _STR)
_PATH = re.compile(rb'"path":' + _STR)
_OLD = re.compile(rb'"old_path":' + _STR)
_INO = re.compile(rb'"ino":(\d+)')


def _fields(line: bytes) -> tuple[str, int, bytes, bytes | None]:
    """(fs, ino, path, old_path) of one event line, without parsing all of it (the index's build time is mostly
    JSON otherwise). The first "path": is the event's own: the keys before it (id, seq, time, vm, fs, kind) hold
    no guest string, and a quote inside a JSON string is always escaped."""
    fs, path, ino = _FS.search(line), _PATH.search(line), _INO.search(line)
    old = _OLD.search(line) if b'"old_path":' in line else None
    return (_unjson(fs.group(1)).decode("utf-8", "surrogateescape") if fs else "", int(ino.group(1)) if ino else 0,
            _unjson(path.group(1)) if path else b"", _unjson(old.group(1)) if old else None)


def _unjson(raw: bytes) -> bytes:
    """A JSON string's body as the path's bytes (\\udcXX escapes back to the raw bytes they stand for)."""
    if b"\\" not in raw:
        return raw
    return _b(json.loads(b'"' + raw + b'"'))


def _key(path: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(path, digest_size=8).digest(), "big", signed=True)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _read(f, off: int, n: int) -> Mutation:
    f.seek(off)
    return Mutation.from_json(f.read(n).decode())


def _lives(events: list[tuple[int, Mutation]]) -> Iterator[list[tuple[int, Mutation]]]:
    """Split one inode number's events into the lives of the files that had it: a birth starts one, a delete
    that leaves no link (or an rmdir) ends one."""
    life: list[tuple[int, Mutation]] = []
    for off, ev in events:
        if ev.is_error:
            continue
        if ev.kind in BIRTHS and life:
            yield life
            life = []
        life.append((off, ev))
        if ev.kind == "rmdir" or (ev.kind == "delete" and not ev.links):
            yield life
            life = []
    if life:
        yield life


# -- the engine as of a moment

@dataclass(frozen=True, slots=True)
class Moment:
    """A point of the write log: after every record with seq <= `seq`; `time_ns` the moment asked for (a time),
    or that record's time (a seq)."""

    seq: int
    time_ns: int
    by_time: bool


class HistoryError(ValueError):
    """WHEN outside the retained history, or a path that did not exist then."""


def moment(log: Path, *, seq: int | None = None, time_ns: int | None = None, now_ns: int | None = None,
           checkpoint=None) -> Moment:
    """Resolve a seq or a time to the log's point, or say clearly why it is outside the retained history.
    `checkpoint` (tap.retention.Checkpoint): the log was folded up to it, which is where the history starts."""
    from tap.writelog import Gap, read_records

    first = last = (checkpoint.seq, checkpoint.time_ns) if checkpoint is not None else None
    chosen: tuple[int, int] | None = None
    if checkpoint is not None and seq == checkpoint.seq:
        chosen = first
    for rec in read_records(log, checkpoint.seq + 1 if checkpoint is not None else 1):
        if chosen is not None:
            break
        if type(rec) is Gap:
            continue
        if first is None:
            first = (rec.seq, rec.time_ns)
        if time_ns is not None and rec.time_ns > time_ns and chosen is None:
            chosen = last or (0, time_ns)
        if seq is not None and rec.seq == seq:
            chosen = (rec.seq, rec.time_ns)
        last = (rec.seq, rec.time_ns)
        if chosen is not None:
            break
    if first is None:
        raise HistoryError("the write log holds no records: there is no history yet")
    early = (seq is not None and 0 < seq < first[0]) or (time_ns is not None and time_ns < first[1])
    if chosen is not None and not early:
        return Moment(chosen[0], chosen[1] if seq is not None else time_ns, seq is None)
    end = _last_record(log) or last
    span = f"the retained history is seq {first[0]} ({_iso(first[1])}) to seq {end[0]} ({_iso(end[1])})"
    if checkpoint is not None:
        span += "; what came before was folded into a checkpoint (attach --retain) and is gone"
    if seq is not None:
        if seq == 0 and checkpoint is None:
            return Moment(0, 0, False)
        if seq < first[0]:
            raise HistoryError(f"seq {seq} is before the retained history: {span}")
        if chosen is None:
            raise HistoryError(f"seq {seq} is after the end of the history: {span}")
        return Moment(chosen[0], chosen[1], False)
    assert time_ns is not None
    if time_ns < first[1]:
        raise HistoryError(f"{_iso(time_ns)} is before the retained history: {span}"
                           + (" (--at 0 is the base image)" if checkpoint is None else ""))
    if chosen is None:
        if now_ns is not None and time_ns > now_ns:
            raise HistoryError(f"{_iso(time_ns)} is after the end of the history (in the future): {span}")
        chosen = last
    return Moment(chosen[0], time_ns, True)


def _last_record(log: Path) -> tuple[int, int] | None:
    from tap.writelog import Gap, last_seq, read_records

    end = last_seq(log)
    for rec in read_records(log, end, end):
        if type(rec) is not Gap:
            return rec.seq, rec.time_ns
    return None


def _iso(ns: int) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def engine_start(workdir: Path, size: int, checkpoint=None, *, base: Path | None = None, index: Path | None = None,
                 vm: str = "", progress: Callable[[int, int], None] | None = None):
    """An Engine at the start of the retained history: the base (or its index) at seq 0, or a retention
    checkpoint (tap.retention.Checkpoint: its image and index) at its seq, which `base` and `index` then do not
    override. From a checkpoint the names its index refused are not reported again: the events before it did."""
    from inference.engine import Engine

    if checkpoint is None:
        return Engine(workdir, size, base=base, index=index, vm=vm, progress=progress)
    try:
        engine = Engine(workdir, size, base=checkpoint.image, index=checkpoint.index, vm=vm, progress=progress)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:  # an index not of this image (the state
        # directory moved, say), or unreadable: it only saves time, so the image is indexed instead
        log.warning("checkpoint %d: %s; indexing its image instead", checkpoint.seq, exc)
        engine = Engine(workdir, size, base=checkpoint.image, vm=vm, progress=progress)
    engine.last_seq, engine.last_time_ns = checkpoint.seq, checkpoint.time_ns
    engine.names_refused = False
    return engine


def engine_at(log: Path, size: int, at: Moment, *, base: Path | None = None, index: Path | None = None,
              workdir: Path | None = None, progress: Callable[[int, int], None] | None = None, checkpoint=None):
    """An Engine replayed from the base (or the retention `checkpoint`) over the records up to `at` (its replica in
    a temporary `workdir`, removed by the caller). At a time, what fell due by then (a settle, data waiting for
    its commit) is decided as the live view would have; nothing pending is forced out (no finish): the tree is
    the last point's."""
    from tap.writelog import Gap, read_records

    start = checkpoint.seq if checkpoint is not None else 0
    if at.seq < start:
        raise HistoryError(f"seq {at.seq} is before the retained history: the write log was folded into a "
                           f"checkpoint at seq {start}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mirrorfs-at-"))
    engine = engine_start(workdir, size, checkpoint, base=base, index=index)
    engine.hash_limit = None  # nobody reads these events
    batch: list = []
    for rec in read_records(log, start + 1, at.seq) if at.seq > start else ():
        if type(rec) is Gap:
            continue
        batch.append(rec)
        if len(batch) >= 256:
            engine.process(batch)
            batch = []
            if progress is not None:
                progress(rec.seq, at.seq)
    if batch:
        engine.process(batch)
    if at.by_time and at.seq:
        engine.tick(at.time_ns)
    return engine

"""Small text files' bytes by content hash, kept for diffs of later changes (issue 14: `--diff`).

A diff needs the bytes before a change, and by the time a modify event is emitted the engine's replica holds the new
ones; `events --diff` may run days later. So when the engine hashes a regular file of at most `file_limit` bytes
(inference/hashes.py) it keeps the bytes here too, keyed by their sha256, and events carry `old_sha256` beside
`sha256`: a diff is then two look-ups (mirrorfs/stream/diffs.py). Only text is kept (`is_text`); a binary file
gets a row without bytes, so a reader can say "binary" rather than "not kept".

The guest is hostile and may change a million files: the store is bounded in bytes (each row costs its bytes plus
ROW_COST, so a million tiny files count too); past the bound the oldest rows go first (a row seen again counts as
new). It is one SQLite file, DIR/blobs.db, 0600 (0640 with a group) as the state directory's other files. Not WAL:
a reader with read-only access (a `--group` member) could not open it. The writer's journal is in memory (a third
of the cost of a journal file, measured): a writer killed inside a commit may leave the file damaged, so the next
writer checks it at open and starts it again if it is, and a reader checks each version's sha256 and calls a
mismatch "not kept". Derived data: losing it costs diffs, never events.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path

log = logging.getLogger("mirrorfs.blobs")

DEFAULT_FILE_LIMIT = 64 << 10   # --diff-limit: larger files are not kept (their diffs say so)
MAX_FILE_LIMIT = 1 << 20        # difflib's cost grows with the lines; see diffs.py's work budget
DEFAULT_STORE_LIMIT = 64 << 20  # --diff-store: the store's bound in bytes
ROW_COST = 160                  # what a row costs besides its bytes (key, columns, b-tree share)
EVICT_TO = 0.9                  # eviction frees down to this share of the bound, so it runs once per ~10 %
SCHEMA = 1
BUSY_MS = 5000


def is_text(data: bytes) -> bool:
    """The text rule: no NUL byte and valid UTF-8 (so a Latin-1 or UTF-16 file counts as binary). Control
    characters are text; the text renderer escapes them."""
    if b"\0" in data:
        return False
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class BlobStore:
    """The engine's side: `keep` while hashing, `commit` after each batch of events. One writer per state dir."""

    def __init__(self, path: Path, limit: int = DEFAULT_STORE_LIMIT, file_limit: int = DEFAULT_FILE_LIMIT) -> None:
        from tap.state import open_private

        self.path, self.limit, self.file_limit = Path(path), limit, min(file_limit, MAX_FILE_LIMIT)
        os.close(open_private(self.path, os.O_RDWR))  # the state directory's mode and group
        try:
            self.db = self._open()
        except sqlite3.DatabaseError:  # damaged (a writer killed in a commit) or not ours: start again
            os.truncate(self.path, 0)
            self.db = self._open()
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('file_limit', ?)", (self.file_limit,))
        n, total = self.db.execute("SELECT MAX(n), SUM(cost) FROM blob").fetchone()
        self.next, self.total = (n or 0) + 1, total or 0
        self.kept = self.evicted = 0
        self.seconds = 0.0  # spent committing (keeping is inside the hashers' time): the benchmark's numerator
        self._open = self.failed = False

    def _open(self) -> sqlite3.Connection:
        # the engine's thread may not be the one that made it (replay --mount): Engine.lock keeps it one at a time
        db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_MS / 1000, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=MEMORY")  # see the module docstring
            db.execute("PRAGMA synchronous=OFF")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check")
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
                db.executescript("""
                    DROP TABLE IF EXISTS blob; DROP TABLE IF EXISTS meta;
                    CREATE TABLE blob (n INTEGER PRIMARY KEY, sha BLOB UNIQUE NOT NULL, cost INTEGER NOT NULL,
                                       data BLOB);
                    CREATE TABLE meta (k TEXT PRIMARY KEY, v);
                """)
                db.execute(f"PRAGMA user_version={SCHEMA}")
        except BaseException:
            db.close()
            raise
        return db

    def keep(self, sha256: str, data: bytes) -> None:
        """Keep a file's bytes (text) or the fact that it is binary, under its hex sha256. A failing store (a full
        disk, say) is given up with one warning: it costs diffs, never the engine."""
        if len(data) > self.file_limit or self.failed:
            return
        try:
            self._keep(bytes.fromhex(sha256), data)
        except sqlite3.Error as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        log.warning("the diff store %s failed (%s): no more versions are kept for diffs until the engine restarts",
                    self.path, exc)
        self.failed = True
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def _keep(self, key: bytes, data: bytes) -> None:
        if not self._open:
            self.db.execute("BEGIN")
            self._open = True
        text = is_text(data)
        cost = ROW_COST + (len(data) if text else 0)
        if self.db.execute("INSERT OR IGNORE INTO blob VALUES (?,?,?,?)",
                           (self.next, key, cost, data if text else None)).rowcount:
            self.total += cost
            self.kept += 1
        else:  # kept already: it counts as new again
            self.db.execute("UPDATE blob SET n=? WHERE sha=?", (self.next, key))
        self.next += 1
        if self.total > self.limit:
            self._evict()

    def _evict(self) -> None:
        need, freed, cut = self.total - int(self.limit * EVICT_TO), 0, None
        for n, cost in self.db.execute("SELECT n, cost FROM blob ORDER BY n"):
            freed, cut = freed + cost, n
            if freed >= need:
                break
        if cut is not None:
            self.evicted += self.db.execute("DELETE FROM blob WHERE n<=?", (cut,)).rowcount
            self.total -= freed

    def commit(self) -> None:
        if self._open and not self.failed:
            t0 = time.perf_counter()
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._fail(exc)
            self._open = False
            self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        self.commit()
        if not self.failed:
            self.db.close()


class BlobReader:
    """A reader's side (events --diff, publish --diff), read-only: any number, while the engine writes."""

    def __init__(self, path: Path) -> None:
        self.db: sqlite3.Connection | None = None
        self.file_limit = DEFAULT_FILE_LIMIT
        if Path(path).is_file():
            try:
                self.db = sqlite3.connect(f"file:{Path(path).absolute()}?mode=ro", uri=True,
                                          timeout=BUSY_MS / 1000)
                row = self.db.execute("SELECT v FROM meta WHERE k='file_limit'").fetchone()
                self.file_limit = int(row[0]) if row else self.file_limit
            except sqlite3.Error:
                self.db = None  # not ours, or damaged: every diff says "not kept"

    def get(self, sha256: str) -> tuple[bool, bytes | None] | None:
        """(is text, bytes if text) of a kept version; None: not kept (evicted, too large, or never seen)."""
        if self.db is None or not sha256:
            return None
        try:
            row = self.db.execute("SELECT data FROM blob WHERE sha=?", (bytes.fromhex(sha256),)).fetchone()
        except (sqlite3.Error, ValueError):
            return None
        if row is None:
            return None
        if row[0] is not None and hashlib.sha256(row[0]).hexdigest() != sha256.lower():
            return None  # a page a killed writer left half written: not this version
        return (row[0] is not None, row[0])

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

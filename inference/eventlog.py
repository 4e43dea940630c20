"""The event log: the engine's Mutations as JSON lines in the state directory (mirrorfs-events(5)).

The log gives every event its id "SEQ-N" (the N-th event, from 1, whose record seq is SEQ): several events
share a seq (one jbd2 commit completes many changes), and consumers need one stable, totally ordered position
per event to resume and deduplicate. A replay of the same write log gives the same ids.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from inference.events import ErrorEvent, Kind, Mutation, format_id, parse_id
from inference.wake import DirWake
from tap.writelog import Gap


def last_position(path: Path) -> tuple[int, int]:
    """(seq, N) of the last complete event in a log file, (0, 0) if none."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            back = 1 << 16
            while True:
                start = max(size - back, 0)
                f.seek(start)
                lines = f.read(size - start).split(b"\n")[:-1]  # the part after the last newline is torn
                if start > 0:
                    lines = lines[1:]
                for line in reversed(lines):
                    if line.strip():
                        d = json.loads(line)
                        return parse_id(d["id"]) if d.get("id") else (d["seq"], 0)
                if start == 0:
                    return 0, 0
                back *= 4
    except FileNotFoundError:
        return 0, 0


_SEQ = re.compile(rb'"seq":(\d+)')


def cut_after(path: Path, seq: int) -> None:
    """Drop the events after `seq` (and a torn last line) from an event log: those a replay from a checkpoint
    at `seq` makes again. Events come in seq order, so everything from the first later one goes."""
    try:
        f = open(path, "r+b")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with f:
        keep = 0
        for line in f:
            m = _SEQ.search(line, 0, 200)
            if not line.endswith(b"\n") or (m is not None and int(m.group(1)) > seq):
                break
            keep += len(line)
        f.truncate(keep)


class EventLog:
    """Appends events; each line is complete when written (one write per batch), so readers never see half."""

    def __init__(self, path: Path, *, truncate: bool = False, keep_until: int | None = None) -> None:
        """`truncate`: start a new log; with `keep_until` (a replay from a retention checkpoint at that seq) the
        events up to it stay, and ids go on from the last of them."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate and keep_until is not None:
            cut_after(self.path, keep_until)
            truncate = False
        self._last = (0, 0) if truncate else last_position(self.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(self.path, flags, 0o640)
        self.count = 0
        self.listeners: list[Callable[[list[Mutation]], None]] = []  # told of each appended batch (metrics)

    def assign_ids(self, events: Iterable[Mutation]) -> list[Mutation]:
        """Stamp each event with the next id of its seq (events come in seq order)."""
        out = list(events)
        seq, n = self._last
        for e in out:
            if e.seq > seq:
                seq, n = e.seq, 0
            n += 1  # a late event with an older seq (should not happen) still gets a fresh, increasing id
            e.id = format_id(seq, n)
        self._last = (seq, n)
        return out

    def append(self, events: Iterable[Mutation]) -> list[Mutation]:
        events = self.assign_ids(events)
        lines = [e.to_json() + "\n" for e in events]
        if lines:
            os.write(self._fd, "".join(lines).encode())
            self.count += len(lines)
            for listener in self.listeners:
                listener(events)
        return events

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventTail:
    """Reads complete lines of an event log from a byte offset, for followers that keep their own position.
    A file that shrinks (a replay rewrote it) starts again from 0: `restarted` tells the caller."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self.restarted = False
        self._f = None
        self._buf = b""

    def poll(self, max_bytes: int = 1 << 20) -> list[tuple[int, bytes]]:
        """New complete lines as (offset after the line, line bytes); [] if nothing new."""
        if self._f is None:
            try:
                self._f = open(self.path, "rb")  # noqa: SIM115 - kept open across polls
            except FileNotFoundError:
                return []
        st = os.fstat(self._f.fileno())
        try:
            path_ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            path_ino = st.st_ino
        if path_ino != st.st_ino or st.st_size < self.offset:
            self._f.close()
            self._f = None
            self.offset, self._buf, self.restarted = 0, b"", True
            return self.poll(max_bytes)
        self._f.seek(self.offset + len(self._buf))
        chunk = self._f.read(max_bytes)
        if not chunk:
            return []
        data = self._buf + chunk
        out: list[tuple[int, bytes]] = []
        pos = 0
        while (nl := data.find(b"\n", pos)) >= 0:
            line = data[pos:nl]
            pos = nl + 1
            if line.strip():
                out.append((self.offset + pos, line))
        self.offset += pos
        self._buf = data[pos:]
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_events(path: Path, since: int = 0, *, follow: bool = False, interval: float = 1.0,
                after: tuple[int, int] = (0, 0)) -> Iterator[Mutation]:
    """Events with seq >= since and position > after; with `follow`, keep waiting for more (until the caller
    stops), woken by each append (inotify on the log's directory; `interval` only bounds a missed wake-up)."""
    tail = EventTail(path)
    wake = DirWake(Path(path).parent) if follow else None
    try:
        while True:
            lines = tail.poll()
            for _, line in lines:
                ev = Mutation.from_json(line.decode())
                if ev.seq >= since and ev.position > after:
                    yield ev
            if lines:
                continue
            if wake is None:
                return
            wake.wait(interval)
    finally:
        tail.close()
        if wake is not None:
            wake.close()


def gap_event(gap: Gap, *, vm: str = "", time_ns: int = 0) -> Mutation:
    """The `error` event for seqs the write log lost (damaged or missing on disk): the stream says what it
    cannot show, in seq order (it carries the last lost seq), instead of skipping it in silence."""
    return ErrorEvent(seq=gap.last_seq, time=(time_ns or time.time_ns()) / 1e9, kind=Kind.ERROR, path="/", vm=vm,
                    message=f"{gap}; the writes they held are missing from the engine's disk and events")

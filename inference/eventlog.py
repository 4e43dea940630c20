"""The event log: the engine's Mutations as JSON lines in the state directory (mirrorfs-events(5))."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from inference.events import Mutation


class EventLog:
    """Appends events; each line is complete when written (one write per batch), so readers never see half."""

    def __init__(self, path: Path, *, truncate: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(self.path, flags, 0o644)
        self.count = 0

    def append(self, events: Iterable[Mutation]) -> None:
        lines = [e.to_json() + "\n" for e in events]
        if lines:
            os.write(self._fd, "".join(lines).encode())
            self.count += len(lines)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: Path, since: int = 0, *, follow: bool = False, interval: float = 0.1) -> Iterator[Mutation]:
    """Events with seq >= since; with `follow`, keep waiting for more (until the caller stops)."""
    with open(path, "rb") as f:
        buf = b""
        while True:
            chunk = f.read(1 << 20)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        ev = Mutation.from_json(line.decode())
                        if ev.seq >= since:
                            yield ev
                continue
            if not follow:
                return
            time.sleep(interval)

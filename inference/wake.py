"""Wake a follower when files in its directories change (inotify through ctypes), instead of polling.

The tap appends every write-log record with one writev (IN_MODIFY on the segment, IN_CREATE for a new one), the
engine appends events.jsonl with one write per batch, and `attach.json` is replaced by a rename (IN_MOVED_TO):
followers of those files sleep in `wait()` until one of them moves, or until their own deadline. Waking early is
always harmless (the follower polls and finds nothing); what this must never do is sleep through a change, so a
failed watch (no inotify, too many watches) makes `wait()` a plain sleep of the timeout, as polling was.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import threading
import time
from pathlib import Path

log = logging.getLogger("mirrorfs.wake")

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
CHANGES = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class DirWake:
    """`wait(timeout)` returns as soon as a file in one of `dirs` is written, created or renamed into it (True),
    or after `timeout` (False). `wake()` (any thread) ends a wait at once, e.g. to stop."""

    def __init__(self, *dirs: Path, mask: int = CHANGES) -> None:
        self._fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        if self._fd < 0:
            log.warning("inotify unavailable (%s): following by timeouts only", os.strerror(ctypes.get_errno()))
        for d in dirs:
            self.add(d, mask)

    def add(self, directory: Path, mask: int = CHANGES) -> bool:
        if self._fd < 0:
            return False
        if _libc.inotify_add_watch(self._fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                log.warning("cannot watch %s (%s): following it by timeouts only", directory, os.strerror(err))
            return False
        return True

    def wake(self) -> None:
        try:
            os.write(self._pipe[1], b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already, or we are closed

    def wait(self, timeout: float | None) -> bool:
        """Block until a change (drained, so the next wait blocks again), a wake(), or `timeout` seconds (None:
        no timeout)."""
        if self._pipe[0] < 0:
            time.sleep(max(timeout or 0, 0))  # closed
            return False
        p = select.poll()
        if self._fd >= 0:
            p.register(self._fd, select.POLLIN)
        p.register(self._pipe[0], select.POLLIN)
        ready = p.poll(None if timeout is None else max(timeout, 0) * 1000)
        for fd, _ in ready:
            _drain(fd)
        return bool(ready)

    def fileno(self) -> int:
        """The inotify descriptor, readable once a change came (for an event loop's own wait; -1: none)."""
        return self._fd

    def drain(self) -> None:
        """Forget changes seen so far (the caller is about to look for itself)."""
        if self._fd >= 0:
            _drain(self._fd)

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, *self._pipe):
                if fd >= 0:
                    os.close(fd)
            self._fd, self._pipe = -1, (-1, -1)

    def __enter__(self) -> DirWake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except (BlockingIOError, OSError):
        pass

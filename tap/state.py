"""The state directory: one per watched disk, owned by one attach at a time.

Layout (everything mirrorfs writes for a disk stays in here):
  lock            flock'ed by the running attach
  state.json      facts fixed at creation: disk size, device, export name
  attach.json     the running (or last) attach: pid, device, mode, sync, ready, last seq
  log/            the write log (tap.writelog)
  replica.img     the disk as the log makes it now (tap.replica), with replica.img.seq
  nbd.sock        the NBD socket QEMU's mirror job writes to
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

EXPORT_NAME = "mirrorfs"
MAX_UNIX_PATH = 107


class StateError(Exception):
    """The state directory cannot be used; the message names the cause and the fix."""


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class StateDir:
    """Paths and metadata of a state directory; `lock()` makes this process its one writer."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None

    log = property(lambda self: self.path / "log")
    replica = property(lambda self: self.path / "replica.img")
    state_file = property(lambda self: self.path / "state.json")
    attach_file = property(lambda self: self.path / "attach.json")

    @property
    def nbd_socket(self) -> Path:
        """DIR/nbd.sock, or a short name in /tmp when DIR is too deep for a unix socket path."""
        sock = self.path / "nbd.sock"
        if len(os.fsencode(sock)) <= MAX_UNIX_PATH:
            return sock
        digest = hashlib.sha1(os.fsencode(self.path)).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"mirrorfs-{digest}.sock"

    def lock(self) -> None:
        """Create the directory if needed and take its lock, or explain who holds it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {self.path}: {exc.strerror}") from exc
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = (read_json(self.attach_file) or {}).get("pid", "another process")
            raise StateError(
                f"the state directory {self.path} is in use by pid {holder}: stop that `mirrorfs attach` "
                "(Ctrl-C or SIGTERM) or choose another --state") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def read_state(self) -> dict[str, Any] | None:
        return read_json(self.state_file)

    def require_state(self) -> dict[str, Any]:
        """state.json of a directory that an attach has recorded into, or a clear error."""
        st = self.read_state()
        if st is None or not isinstance(st.get("size"), int):
            raise StateError(
                f"{self.path} is not a mirrorfs state directory (no state.json): "
                "record into it first with `mirrorfs attach --state DIR`")
        return st

    def init_state(self, size: int, device: str) -> dict[str, Any]:
        """Record the disk's facts, or check that they match an earlier attach to this directory."""
        st = self.read_state()
        if st is not None:
            if st.get("size") != size:
                raise StateError(
                    f"the state directory {self.path} records a disk of {st.get('size')} bytes but "
                    f"{device} has {size}: use a new --state for a different disk")
            return st
        st = {"size": size, "device": device, "export": EXPORT_NAME, "created": time.time()}
        write_json_atomic(self.state_file, st)
        return st

    def write_attach(self, info: dict[str, Any]) -> None:
        write_json_atomic(self.attach_file, info)

    def read_attach(self) -> dict[str, Any] | None:
        return read_json(self.attach_file)

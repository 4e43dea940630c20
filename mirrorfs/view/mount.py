"""Mount hygiene: what is mounted where, stale mounts, unmounting, the mount point, the view's readahead."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger("mirrorfs.mount")

READAHEAD_KB = 4096  # the view's readahead window (set_readahead)
FSTYPE = "fuse.mirrorfs"


class MountError(OSError):
    """A user-facing mount failure (an OSError, so the CLI prints it without importing this module)."""


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_type(mnt: Path) -> str | None:
    """The file-system type mounted exactly at `mnt` (the top one), or None."""
    target = os.path.realpath(mnt)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = right.split()[0]
    return found


def is_stale(mnt: Path, timeout: float = 5.0) -> bool:
    """True if the FUSE server behind `mnt` is gone (ENOTCONN). stat alone can answer from the attribute cache
    for a second after a crash, so open the directory, which always asks the server; in a thread, so a live but
    wedged server cannot hang us."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.close(os.open(mnt, os.O_RDONLY | os.O_DIRECTORY))
            result.append(False)
        except OSError as exc:
            result.append(exc.errno == errno.ENOTCONN)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def unmount(mnt: Path, *, lazy: bool = False) -> bool:
    """fusermount3 -u (then umount -l as root); True if nothing is mounted there afterwards."""
    cmds = [["fusermount3", "-u", *(["-z"] if lazy else []), str(mnt)]]
    if lazy:
        cmds.append(["umount", "-l", str(mnt)])
    for cmd in cmds:
        try:
            subprocess.run(cmd, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if mount_type(mnt) is None:
            return True
    return mount_type(mnt) is None


def mount_device(target: str) -> str | None:
    """"major:minor" of the file system mounted exactly at `target` (a resolved path; the top mount), from
    mountinfo: no request reaches the file system (resolving the path of a FUSE mount whose loop is not running
    yet would hang)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")[0].split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields[2]
    return found


def set_readahead(mnt: str, kib: int = READAHEAD_KB) -> bool:
    """Raise the view's readahead window (its bdi's read_ahead_kb; FUSE starts at 128 KiB): a sequential read is
    then asked of us in requests of up to 1 MiB (libfuse's max_pages), with more of them in flight, instead of
    128 KiB ones, each of which costs a Python round trip. Root only; False if it could not be set."""
    dev = mount_device(mnt)
    if dev is None:
        return False
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
        return True
    except OSError as exc:
        log.info("readahead of %s left as it is: %s", mnt, exc)
        return False


def readahead_after_init(target: str) -> None:
    """set_readahead once the kernel has taken FUSE's INIT reply, which lowers the window to what libfuse was
    offered at mount time (128 KiB): a request answered (this stat, from a worker thread, never the trio
    thread) means INIT is done."""
    try:
        os.stat(target)
    except OSError:
        return
    set_readahead(target)


def prepare_mountpoint(mnt: Path) -> None:
    """Clean a stale mount a crashed mirrorfs left (ENOTCONN); refuse a live one."""
    kind = mount_type(mnt)
    if kind is not None:
        if is_stale(mnt):
            print(f"mirrorfs: cleaning up a stale mount at {mnt} (a previous mirrorfs died)", file=sys.stderr)
            if not unmount(mnt, lazy=True):
                raise MountError(f"could not unmount the stale mount at {mnt}")
        elif kind == FSTYPE:
            raise MountError(f"{mnt} is already served by a running mirrorfs (mirrorfs umount {mnt})")
    if not mnt.is_dir():
        raise MountError(f"mount point {mnt} is not a directory")

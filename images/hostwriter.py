"""The host kernel as the writer, without a VM: real ext4 writes that a mirror job can tap.

Two daemons (docs/ARCHITECTURE.md "Host kernel writer"): daemon 1 holds the disk (node `disk0`, QMP for the mirror,
NBD export); daemon 2 re-serves that export as a writable FUSE file. A single daemon cannot do it: its FUSE
export holds RESIZE, which blockdev-mirror refuses to share. The host mounts the FUSE file through a loop
device, so every kernel write passes through daemon 1's block layer, where the mirror sees it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

DAEMON = "qemu-storage-daemon"


def _wait(cond: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str,
          timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{DAEMON} did not {what}:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM by pid (the daemon flushes and ends its exports), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _is_mountpoint(path: Path) -> bool:
    target = os.fsencode(path)
    with open("/proc/self/mounts", "rb") as f:
        return any(line.split()[1].replace(b"\\040", b" ") == target for line in f)


class HostWriter:
    """Daemon 1 (start/stop) serves the disk and QMP; mount() adds daemon 2, a loop device and the mount."""

    node = "disk0"

    def __init__(self, disk: Path, workdir: Path) -> None:
        self.disk = Path(disk)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp = self.workdir / "qmp.sock"
        self.export_sock = self.workdir / "export.sock"
        self.fuse_file = self.workdir / "disk.fuse"
        self.mnt = self.workdir / "mnt"
        self.loop: str | None = None
        self._d1: subprocess.Popen[bytes] | None = None
        self._d2: subprocess.Popen[bytes] | None = None

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as f:
            return subprocess.Popen([DAEMON, *args], stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                    start_new_session=True)

    def start(self) -> HostWriter:
        """Start daemon 1: file + raw node `disk0`, NBD export on a unix socket, QMP on workdir/qmp.sock.

        Idempotent (the context manager starts it too): a second daemon would be left running."""
        if self._d1 is not None and self._d1.poll() is None:
            return self
        for sock in (self.qmp, self.export_sock):
            sock.unlink(missing_ok=True)
        self._d1 = self._spawn(
            "daemon1",
            "--blockdev", f"driver=file,node-name=f0,filename={self.disk}",
            "--blockdev", f"driver=raw,node-name={self.node},file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={self.export_sock}",  # must precede the export
            "--export", f"type=nbd,id=e0,node-name={self.node},name={self.node},writable=on",
            "--chardev", f"socket,id=qmp,path={self.qmp},server=on,wait=off",
            "--monitor", "chardev=qmp")
        _wait(lambda: self.qmp.is_socket() and self.export_sock.is_socket(), self._d1,
              self.workdir / "daemon1.log", "open its sockets")
        return self

    def loop_device(self, *, offset: int = 0, sizelimit: int = 0, partscan: bool = False) -> str:
        """Serve the NBD export as a FUSE file (daemon 2) and attach a loop device to it (unmount() detaches).

        offset/sizelimit (bytes) put the loop device on one partition or one linear LV segment of the disk;
        partscan makes the kernel read its partition table (/dev/loopNpM), as a guest's kernel would."""
        if self._d1 is None:
            self.start()
        size = self.disk.stat().st_size
        self.fuse_file.touch()
        self._d2 = self._spawn(
            "daemon2",
            "--blockdev", f"driver=nbd,node-name=n0,server.type=unix,server.path={self.export_sock},"
                          f"export={self.node}",
            "--export", f"type=fuse,id=e1,node-name=n0,mountpoint={self.fuse_file},writable=on")
        _wait(lambda: _is_mountpoint(self.fuse_file) and self.fuse_file.stat().st_size == size, self._d2,
              self.workdir / "daemon2.log", "export the FUSE file")
        window = [*(["-o", str(offset)] if offset else []), *(["--sizelimit", str(sizelimit)] if sizelimit else [])]
        self.loop = subprocess.run(["losetup", "-f", "--show", *window, *(["-P"] if partscan else []),
                                    str(self.fuse_file)], check=True, capture_output=True, text=True).stdout.strip()
        return self.loop

    def mount(self, fstype: str | None = None, *, offset: int = 0, sizelimit: int = 0) -> Path:
        """loop_device(), then mount it at workdir/mnt."""
        self.loop_device(offset=offset, sizelimit=sizelimit)
        self.mnt.mkdir(exist_ok=True)
        p = subprocess.run(["mount", *(["-t", fstype] if fstype else []), self.loop, str(self.mnt)],
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"mount {self.loop} failed: {p.stderr.strip()}")
        return self.mnt

    def run(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a shell script in the mount (cwd and $MNT); the caller checks returncode."""
        return subprocess.run(["sh", "-c", script], cwd=self.mnt, env={**os.environ, "MNT": str(self.mnt)},
                              capture_output=True, text=True, timeout=timeout)

    def unmount(self) -> None:
        """sync, umount, detach the loop device, stop daemon 2; safe to call twice or after a failed mount."""
        subprocess.run(["sync"], check=False)
        if _is_mountpoint(self.mnt):
            if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None
        _kill(self._d2)
        self._d2 = None
        if _is_mountpoint(self.fuse_file):  # daemon 2 died without ending its FUSE export
            subprocess.run(["umount", "-l", str(self.fuse_file)], capture_output=True)

    def stop(self) -> None:
        """Stop daemon 1 (it flushes the disk file)."""
        _kill(self._d1)
        self._d1 = None

    def __enter__(self) -> HostWriter:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.unmount()
        finally:
            self.stop()

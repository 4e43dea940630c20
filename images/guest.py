"""A TCG QEMU guest that runs one workload script against a disk under test (the VM whose writes we mirror).

The guest is our kernel + busybox initramfs (images.build); its /init finds the disk (virtio serial `disk`)
and the workload (a raw disk, serial `workload`), mounts the disk at /mnt, prints `MIRRORFS: init ready`,
runs the script, syncs, prints `MIRRORFS: workload done rc=N` and powers off. With -no-shutdown QEMU then
stays alive, stopped, so a mirror job can still be detached; stop() ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from images.build import artifact

READY = "MIRRORFS: init ready"
DONE = "MIRRORFS: workload done"


class GuestError(RuntimeError):
    """A guest did not reach an expected console line (the message carries the console tail)."""


def write_workload(path: Path, script: str) -> None:
    """The workload disk: the script padded with newlines to 64 KiB (partition probing reads a few blocks)."""
    data = script.encode()
    if not data.endswith(b"\n"):
        data += b"\n"
    path.write_bytes(data + b"\n" * (-len(data) % 65536))


class Guest:
    """One QEMU process. Synchronous and thread-agnostic: it holds only a Popen and file paths, never QMP,
    so the QMP socket stays free for the attach tool (QMP accepts one client at a time)."""

    def __init__(self, disk: Path, workload: str, workdir: Path, *, qmp: Path | None = None,
                 paused: bool = True, disk_format: str = "raw", memory_mb: int = 256, mount_part: str | None = None,
                 drive_id: str = "drive0") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.disk = Path(disk)
        self.drive_id = drive_id
        self.qmp = Path(qmp) if qmp else self.workdir / "qmp.sock"
        if len(os.fsencode(self.qmp)) > 107:
            raise ValueError(f"QMP socket path too long for a unix socket: {self.qmp}")
        self.console_path = self.workdir / "console.log"
        self.log_path = self.workdir / "qemu.log"
        wl = self.workdir / "workload.raw"
        write_workload(wl, workload)
        self.console_path.write_bytes(b"")
        self.qmp.unlink(missing_ok=True)  # a stale socket would make _wait_qmp_socket return early
        append = "console=ttyS0 quiet panic=-1" + (f" mirrorfs.mount={mount_part}" if mount_part else "")
        self.argv = [
            "qemu-system-x86_64", "-M", "q35", "-m", str(memory_mb), "-nographic",
            "-no-reboot", "-no-shutdown", "-nic", "none", "-accel", "tcg", "-monitor", "none",
            "-serial", f"file:{self.console_path}",
            "-kernel", str(artifact("vmlinux")), "-initrd", str(artifact("initramfs.gz")), "-append", append,
            "-drive", f"file={self.disk},format={disk_format},if=none,id={drive_id},cache=writeback",
            "-device", f"virtio-blk-pci,drive={drive_id},serial=disk",
            "-drive", f"file={wl},format=raw,if=none,id=workload,readonly=on",
            "-device", "virtio-blk-pci,drive=workload,serial=workload",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ] + (["-S"] if paused else [])
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True)
        self._wait_qmp_socket()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _wait_qmp_socket(self, timeout: float = 10) -> None:
        """Return once QEMU listens on QMP, so callers can connect straight away."""
        deadline = time.monotonic() + timeout
        while not self.qmp.is_socket():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log_path.read_text(errors="replace")
                raise GuestError(f"QEMU did not open {self.qmp}:\n{log}")
            time.sleep(0.02)

    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        return self.console_path.read_text(errors="replace")

    def running(self) -> bool:
        return self._proc.poll() is None

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Block until `text` is on the console; raise GuestError with the console tail on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.console()
            if text in out:
                return
            exited = self._proc.poll()
            panic = "Kernel panic" in out  # with -no-shutdown QEMU would sit there, stopped
            if exited is not None or panic or time.monotonic() > deadline:
                why = (f"QEMU exited with {exited}" if exited is not None else "guest kernel panic" if panic
                       else f"timeout after {timeout} s")
                qemu_log = self.log_path.read_text(errors="replace")[-2000:]
                raise GuestError(f"{why} waiting for {text!r}; console tail:\n{out[-3000:]}\n"
                                 f"qemu:\n{qemu_log}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM (QEMU flushes its disks and exits), SIGKILL if it lingers; returns the exit code."""
        if self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self._proc.wait()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def run_workload(disk: Path, workload: str, workdir: Path, timeout: float = 300, *, disk_format: str = "raw",
                 mount_part: str | None = None) -> str:
    """Boot unpaused, run `workload` to completion, stop QEMU and return the console text."""
    with Guest(disk, workload, workdir, paused=False, disk_format=disk_format, mount_part=mount_part) as g:
        g.wait_for(DONE, timeout)
        try:
            g.wait_for("reboot: Power down", 10)  # the guest has powered off: nothing left in flight
        except GuestError:
            pass
        return g.console()

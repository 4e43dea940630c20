"""Helpers for the FUSE view tests: wait for a mount, run inotifywait, unmount whatever a test left."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def mounted(mnt: Path) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target and " - fuse.mirrorfs " in line for line in f)


def wait_mounted(mnt: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(mnt):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the serving process exited with {proc.returncode} before mounting {mnt}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{mnt} not mounted within {timeout} s")
        time.sleep(0.05)


def wait_unmounted(mnt: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while mounted(mnt):
        if time.monotonic() > deadline:
            raise AssertionError(f"{mnt} still mounted after {timeout} s")
        time.sleep(0.05)


def force_unmount(mnt: Path) -> None:
    if mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@dataclass
class HostView:
    """A live view of a host-kernel writer's disk: `hw` (images/hostwriter.HostWriter), `host` (its file
    system mounted on the host: write there), `mnt` (the view), `state`, `attach` (tests/tapharness.Attach)."""

    hw: Any
    host: Path
    mnt: Path
    state: Path
    attach: Any


@contextmanager
def host_writer_view(tmp_path: Path, base: Path, disk: Path) -> Iterator[HostView]:
    """The host kernel writes `disk` (a copy of `base`) through qemu-storage-daemon, attached with
    `mirrorfs attach --base BASE --mount`: yields once the view is mounted and the writer's file system too. A
    test detaches itself where it wants the detach's output; on the way out whatever is left is killed and
    unmounted."""
    from images.hostwriter import HostWriter
    from tests.tapharness import Attach

    state, mnt = tmp_path / "state", tmp_path / "view"
    mnt.mkdir()
    attach = None
    try:
        with HostWriter(disk, tmp_path / "qsd") as hw:
            attach = Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), "--mount", str(mnt))
            attach.start()
            wait_mounted(mnt, attach.proc, timeout=120)
            yield HostView(hw, hw.mount(), mnt, state, attach)
    finally:
        if attach is not None and attach.proc is not None and attach.proc.poll() is None:
            attach.proc.kill()
            attach.proc.wait(10)
        force_unmount(mnt)


class Inotify:
    """`inotifywait -m -r` on a tree; each printed line is kept with the host time it was read."""

    FORMAT = "%e|%w%f|%c"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(["inotifywait", "-m", "-r", "--format", self.FORMAT, str(root)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._ready = threading.Event()
        threading.Thread(target=self._stderr, daemon=True).start()
        threading.Thread(target=self._stdout, daemon=True).start()
        if not self._ready.wait(60):
            raise AssertionError("inotifywait did not set up its watches")

    def _stderr(self) -> None:
        self.errors = []
        for line in self.proc.stderr:
            self.errors.append(line)
            if "Watches established" in line:
                self._ready.set()

    def _stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def events(self) -> list[tuple[float, str, str, str]]:
        """(time, events, path relative to the root, cookie)."""
        out = []
        prefix = str(self.root).rstrip("/") + "/"
        for t, line in list(self.lines):
            ev, path, cookie = (line.split("|", 2) + ["", ""])[:3]
            out.append((t, ev, path[len(prefix):] if path.startswith(prefix) else path, cookie))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class OnPty:
    """A program on its own pseudo-terminal (its controlling tty, ROWS x COLS), everything it prints kept: for
    tools that need a terminal, such as `less +F`."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 250) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(os.environ, TERM="xterm", LESS="", LESSHISTFILE="-", LESSSECURE="1")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True,  # then the pty becomes its controlling terminal:
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.master = master
        self.out = bytearray()
        self.chunks: list[tuple[float, int]] = []  # (CLOCK_MONOTONIC, offset in out) of each chunk read
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the program closed the terminal
                break
            if not chunk:
                break
            self.chunks.append((time.monotonic(), len(self.out)))
            self.out.extend(chunk)

    def text_lines(self) -> list[bytes]:
        """What it printed as lines of text: terminal escapes removed, each carriage return starting a new piece
        (a pager redraws its prompt line with CR), empty pieces dropped."""
        plain = strip_terminal(bytes(self.out))
        return [piece for line in plain.split(b"\n") for piece in line.split(b"\r") if piece]

    def stop(self) -> None:
        """End it (SIGTERM, then SIGKILL) and close the terminal; again does nothing."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump.join(5)
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


_ESCAPES = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]"   # CSI: cursor, erase, attributes, modes
                      rb"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: titles
                      rb"|\x1b[()*+][0-9A-Za-z]"     # character sets
                      rb"|\x1b[=>78cDEHMNO]")        # keypad modes, save/restore, index


def strip_terminal(data: bytes) -> bytes:
    """The text of a terminal stream: escape sequences removed (control characters such as CR are kept)."""
    return _ESCAPES.sub(b"", data)


class Tripwire:
    """Tripwire driven non-interactively in `work` (its own keys, config and database) with the policy `rules`
    (twpol.txt; docs/ARCHITECTURE.md "Host tools as agents"): `init()` on a tree, `check(name)` gives the exit code and
    the full report."""

    def __init__(self, work: Path, rules: str) -> None:
        self.work, self.cfg = work, work / "tw.cfg"
        sk, lk = work / "site.key", work / "local.key"
        run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=300)  # noqa: E731
        run("twadmin", "--generate-keys", "--site-keyfile", str(sk), "--site-passphrase", "P1")
        run("twadmin", "--generate-keys", "--local-keyfile", str(lk), "--local-passphrase", "P2")
        (work / "twcfg.txt").write_text(
            f"ROOT=/usr/sbin\nPOLFILE={work}/tw.pol\nDBFILE={work}/tw.twd\nREPORTFILE={work}/report.twr\n"
            f"SITEKEYFILE={sk}\nLOCALKEYFILE={lk}\nEDITOR=/bin/true\nLATEPROMPTING=false\n"
            "LOOSEDIRECTORYCHECKING=false\nMAILNOVIOLATIONS=false\nEMAILREPORTLEVEL=3\nREPORTLEVEL=4\n"
            "MAILMETHOD=SENDMAIL\nSYSLOGREPORTING=false\nMAILPROGRAM=/bin/true\n")
        (work / "twpol.txt").write_text(rules)
        run("twadmin", "--create-cfgfile", "--cfgfile", str(self.cfg), "--site-keyfile", str(sk),
            "--site-passphrase", "P1", str(work / "twcfg.txt"))
        run("twadmin", "--create-polfile", "--cfgfile", str(self.cfg), "--site-keyfile", str(sk),
            "--site-passphrase", "P1", str(work / "twpol.txt"))

    def init(self) -> None:
        subprocess.run(["tripwire", "--init", "--cfgfile", str(self.cfg), "--local-passphrase", "P2"], check=True,
                       capture_output=True, timeout=300)

    def check(self, name: str) -> tuple[int, str]:
        twr = self.work / f"{name}.twr"
        p = subprocess.run(["tripwire", "--check", "--cfgfile", str(self.cfg), "--twrfile", str(twr)],
                           capture_output=True, text=True, timeout=300)
        out = subprocess.run(["twprint", "--print-report", "--cfgfile", str(self.cfg), "--twrfile", str(twr),
                              "--report-level", "4"], capture_output=True, text=True, timeout=300)
        return p.returncode, out.stdout


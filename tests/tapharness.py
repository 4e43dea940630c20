"""Drive the real `mirrorfs` CLI as a subprocess, the way a user or a script would."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO

MIRRORFS = [sys.executable, "-m", "mirrorfs.cli"]


def mirrorfs(*args: str | Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one mirrorfs command to completion; a failure shows its stderr."""
    proc = subprocess.run([*MIRRORFS, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"mirrorfs {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


class Attach:
    """`mirrorfs attach` in the background; waits for attach.json to say ready."""

    def __init__(self, qmp: Path, state: Path, *extra: str, log: Path | None = None) -> None:
        self.state = state
        self.log_path = log or state.parent / f"attach-{state.name}.log"
        # qemu-storage-daemon of images.hostwriter runs its NBD server already (--nbd-server): the base check adds
        # its read-only export there, as a user of such a daemon would say with --verify-nbd
        export = Path(qmp).parent / "export.sock"
        if "--verify-nbd" not in extra and export.is_socket():
            extra = (*extra, "--verify-nbd", str(export))
        self.args = [*MIRRORFS, "attach", "--qmp", str(qmp), "--state", str(state), *extra]
        self.proc: subprocess.Popen | None = None
        self.killed = False  # its engine may outlive it: stop_engines

    def start(self, timeout: float = 60) -> Attach:
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> Attach:
        """Start the process without waiting (a test acts while it checks its base, say)."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def wait_ready(self, timeout: float = 60) -> Attach:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info and info.get("ready") and info.get("pid") == self.proc.pid:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"attach exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"attach not ready within {timeout} s:\n{self.output()}")

    def info(self) -> dict | None:
        try:
            return json.loads((self.state / "attach.json").read_text())
        except (OSError, ValueError):
            return None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def detach(self, timeout: float = 120) -> str:
        """SIGINT, as Ctrl-C would; the attach must exit 0 after cancelling the job."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout)
        self._log.close()
        out = self.output()
        assert rc == 0, f"attach exited {rc} on detach:\n{out}"
        return out

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.killed = True
        self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> Attach:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            self.killed = True
        if self.killed:
            self.stop_engines()

    def stop_engines(self) -> None:
        """Stop the engines this attach process started that still run. A killed attach leaves its engine
        following the log until another attach takes the state dir over (mirrorfs/cli/main.py attach_finished),
        so a test that ends, or fails, with its attach killed stops it itself, by pid."""
        assert self.proc is not None
        mine = f"--attach-pid\0{self.proc.pid}\0".encode()
        for pid in map(int, re.findall(r"inference engine pid (\d+)", self.output())):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if mine not in f.read():
                        continue  # another attach's engine (the log file is shared), or a reused pid
                fd = os.pidfd_open(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            try:
                signal.pidfd_send_signal(fd, signal.SIGTERM)
                if not select.select([fd], [], [], 10)[0]:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)


def log_seqs(state: Path) -> list[int]:
    out = mirrorfs("log", "--state", state, "--json").stdout
    return [json.loads(line)["seq"] for line in out.splitlines()]


def same_bytes(a: Path, b: Path) -> bool:
    """cmp, as the issue asks: byte for byte."""
    return subprocess.run(["cmp", "-s", os.fspath(a), os.fspath(b)]).returncode == 0

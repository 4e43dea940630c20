"""What readers of the live view get: exactly one version per read, no made-up bytes, fresh pages after a change.

The writer is the host kernel's ext4 through qemu-storage-daemon (images/hostwriter.py) under a live
`mirrorfs attach --mount`; the readers are what a user runs on the view: a program that re-reads the whole
file, one that keeps it open and reads it again (as `less +F` does), an mmap reader, coreutils `tail -F` and
`tail -f`, across Debian's logrotate in both its ways (rename and create; copytruncate). Also: inline-data
files (mke2fs -O inline_data) read the bytes the guest wrote, not NULs.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.mountharness import host_writer_view
from tests.support import require_root, require_tools
from tests.tapharness import Attach

pytestmark = pytest.mark.integration

TIMEOUT = 60       # seconds for a synced change to reach the view (typically well under one)
VERSIONS = 10      # versions of the rewritten files
PAGE = 4096


class Live:
    def __init__(self, host: Path, mnt: Path, state: Path, attach: Attach) -> None:
        self.host, self.mnt, self.state, self.attach = host, mnt, state, attach

    def wait(self, name: str, pred, what: str, timeout: float = TIMEOUT) -> bytes:
        """Until the view's `name` satisfies `pred(bytes)`; returns the bytes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = (self.mnt / name).read_bytes()
                if pred(data):
                    return data
            except FileNotFoundError:
                data = None
            assert time.monotonic() < deadline, f"{what}: the view has {data!r:.200}\n{self.attach.output()[-3000:]}"
            time.sleep(0.05)


@contextmanager
def live(tmp_path: Path, features: str = "", populate: Path | None = None) -> Iterator[Live]:
    """A fresh 64 MiB ext4 with 4 KiB blocks (mke2fs -O FEATURES, -d POPULATE), served by `attach --base --mount`,
    and the host kernel's mount of the same disk to write to."""
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "mke2fs", "fusermount3")

    tmp_path.mkdir(parents=True, exist_ok=True)
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "lazy_itable_init=0",  # as a VM's
                    *(["-O", features] if features else []), *(["-d", str(populate)] if populate else []),
                    str(base)], check=True, capture_output=True)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    with host_writer_view(tmp_path, base, disk) as v:
        yield Live(v.host, v.mnt, v.state, v.attach)
        v.hw.unmount()
        out = v.attach.detach()
        # every read of the view was served with bytes (the summary names EIO reads when there were any)
        assert "reads answered EIO" not in out, out[-3000:]


@pytest.fixture(scope="module")
def view(tmp_path_factory) -> Iterator[Live]:
    with live(tmp_path_factory.mktemp("reads")) as lv:
        yield lv


# -- a file rewritten in place

def version_text(v: int, sizes: str) -> bytes:
    """Version v: its number on every line; with `changing` sizes a different number of lines each (4 to 8
    pages), else always 6 pages' worth."""
    count = 600 + 150 * (v % 5) if sizes == "changing" else 900
    return b"".join(b"version %03d line %05d\n" % (v, i) for i in range(count))


def which_version(data: bytes, sizes: str) -> int | None:
    """The version `data` is, whole and alone; None if it is anything else (two versions, a part, NULs)."""
    m = re.match(rb"version (\d{3}) ", data)
    return int(m.group(1)) if m and data == version_text(int(m.group(1)), sizes) else None


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite from offset 0 and cut to the new length: the same inode, its blocks rewritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


class Reader(threading.Thread):
    """Reads the view's file again and again until stopped: by a new open each time (`reopen`), through one
    descriptor kept open, or through one mmap of it kept for the whole run. Keeps what each read gave."""

    def __init__(self, path: Path, how: str) -> None:
        super().__init__(daemon=True)
        self.path, self.how = path, how
        self.reads: list[bytes] = []
        self.times: list[float] = []  # CLOCK_MONOTONIC at each read's end (the daemon's log uses the same clock)
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY) if self.how != "reopen" else -1
        mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ) if self.how == "mmap" else None
        try:
            while not self.stop.is_set():
                try:
                    if self.how == "reopen":  # one read(2) per open: a "read" here is one syscall
                        f = os.open(self.path, os.O_RDONLY)
                        try:
                            data = os.pread(f, 1 << 20, 0)
                        finally:
                            os.close(f)
                    elif mm is not None:
                        data = mm[:]
                    else:
                        data = os.pread(fd, 1 << 20, 0)
                except OSError as exc:
                    self.errors.append(repr(exc))
                    continue
                self.reads.append(data)
                self.times.append(time.monotonic())
                time.sleep(0.002)
        finally:
            if mm is not None:
                mm.close()
            if fd >= 0:
                os.close(fd)


# "changing": each version its own size. A sync of a file rewritten in place to a new size reaches the disk in
# several records (the overwritten blocks, the commit of the new size, the new tail), in either order; the engine
# shows one writeback burst as one consistency point (ExtHandler.tick), so no read mixes two versions.
@pytest.mark.parametrize("sizes", ["same", "changing"])
def test_a_file_rewritten_in_place_every_read_is_exactly_one_version(view, sizes):
    """Each version has its number on every line (and, `changing`, its own size); written in place with sync
    between versions. Readers by path, by an open descriptor, and an mmap of a same-size file kept for the whole
    run: every read is exactly one whole version, versions never go back, and the last version is what they end
    on, without a new open or mmap."""
    versions = [1 + (v * 7) % VERSIONS for v in range(VERSIONS)]  # sizes go up and down
    last = versions[-1]
    name, mname = f"rewritten-{sizes}.txt", f"mapped-{sizes}.bin"
    write_in_place(view.host / name, version_text(versions[0], sizes))
    write_in_place(view.host / mname, bytes([versions[0]]) * (4 * PAGE))
    os.sync()
    view.wait(name, lambda d: which_version(d, sizes) == versions[0], "the first version")
    view.wait(mname, lambda d: d == bytes([versions[0]]) * (4 * PAGE), "the mapped file's first version")
    readers = [Reader(view.mnt / name, how) for how in ("reopen", "open")] + [Reader(view.mnt / mname, "mmap")]
    for r in readers:
        r.start()
    t0 = time.monotonic()
    for v in versions[1:]:
        write_in_place(view.host / name, version_text(v, sizes))
        with open(view.host / mname, "r+b") as f:  # the same size: an mmap of it stays valid
            f.write(bytes([v]) * (4 * PAGE))
        os.sync()
        time.sleep(0.3)
    # every reader gets to the last version without a new open or a new mmap
    deadline = time.monotonic() + TIMEOUT
    while not all(r.reads and (which_version(r.reads[-1], sizes) if r.how != "mmap" else r.reads[-1][0]) == last
                  for r in readers):
        assert time.monotonic() < deadline, [(r.how, r.reads[-1][:40] if r.reads else None) for r in readers]
        time.sleep(0.05)
    for r in readers:
        r.stop.set()
        r.join(10)
    print(f"{VERSIONS} versions in {time.monotonic() - t0:.1f} s; reads: "
          + ", ".join(f"{r.how} {len(r.reads)}" for r in readers))
    for r in readers:
        assert not r.errors, (r.how, r.errors[:5])
        if r.how == "mmap":
            seen = []
            for data in r.reads:
                pages = {data[i:i + PAGE] for i in range(0, len(data), PAGE)}
                # each page is one version's bytes (a page is filled by one read of the view)
                assert all(len(set(p)) == 1 and p[0] in versions for p in pages), sorted({p[:8] for p in pages})
                seen.append(data[0])
        else:
            seen = [which_version(d, sizes) for d in r.reads]
            bad = [(t, d[:30] + b"..." + d[-30:]) for t, d in zip(r.times, r.reads, strict=True)
                   if which_version(d, sizes) is None]  # t: when, to find the read in the daemon's log
            assert not bad, (r.how, len(bad), bad[:3])
        order = [versions.index(v) for v in seen]
        assert order == sorted(order), (r.how, "a read went back to an older version")
        assert seen[-1] == last


# -- logs: tail -F and tail -f across logrotate, both ways

def lines(a: int, b: int) -> bytes:
    return b"".join(b"log line %04d of the app\n" % i for i in range(a, b))


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
    os.sync()


class Tail:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(["tail", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        for stream, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, buf), daemon=True).start()

    @staticmethod
    def _pump(stream, buf: bytearray) -> None:
        while chunk := stream.read1(65536):
            buf.extend(chunk)

    def wait_for(self, what: bytes, where: str = "out", timeout: float = TIMEOUT) -> None:
        buf = self.out if where == "out" else self.err
        deadline = time.monotonic() + timeout
        while what not in buf:
            assert self.proc.poll() is None, f"tail ended: {bytes(self.err)!r}"
            assert time.monotonic() < deadline, f"tail never printed {what!r}: {bytes(buf[-500:])!r} " \
                                                f"(stderr {bytes(self.err)!r})"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def logrotate(conf: Path, state: Path, path: Path, how: str) -> None:
    conf.write_text(f"{path} {{\n    rotate 3\n    nocompress\n    {how}\n}}\n")
    p = subprocess.run(["logrotate", "-f", "-s", str(state), str(conf)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    os.sync()


def test_tail_follows_a_log_across_logrotate_both_ways(view, tmp_path):
    """logrotate `create` (rename, then a new file) and then `copytruncate` (copy, then truncate in place), with
    `tail -F -n +1` on the view from the start and `tail -f` on the new file after the first rotation: tail -F
    prints every line of the log's three lives exactly once, in order, and nothing else (no NUL); tail -f
    prints the second life, says the file was truncated, and prints the third."""
    require_tools("logrotate", "tail")
    log, vlog = view.host / "app.log", view.mnt / "app.log"
    append(log, lines(0, 40))
    view.wait("app.log", lambda d: d == lines(0, 40), "the first lines")
    follow = Tail("-F", "-n", "+1", "-s", "0.2", str(vlog))
    try:
        follow.wait_for(lines(39, 40))
        logrotate(tmp_path / "create.conf", tmp_path / "lr.state", log, "create 0644 root root")
        assert not log.exists() or log.stat().st_size == 0
        view.wait("app.log.1", lambda d: d == lines(0, 40), "the rotated log")
        append(log, lines(40, 80))
        follow.wait_for(lines(79, 80))
        descriptor = Tail("-f", "-n", "+1", "-s", "0.2", str(vlog))
        try:
            descriptor.wait_for(lines(79, 80))
            logrotate(tmp_path / "copy.conf", tmp_path / "lr.state", log, "copytruncate")
            view.wait("app.log.1", lambda d: d == lines(40, 80), "the copied log")
            view.wait("app.log", lambda d: d == b"", "the truncated log")
            follow.wait_for(b"truncated", "err")
            descriptor.wait_for(b"truncated", "err")
            append(log, lines(80, 120))
            follow.wait_for(lines(119, 120))
            descriptor.wait_for(lines(119, 120))
        finally:
            descriptor.stop()
    finally:
        follow.stop()
    assert bytes(follow.out) == lines(0, 120), bytes(follow.out)[-2000:]
    assert bytes(descriptor.out) == lines(40, 120), bytes(descriptor.out)[-2000:]
    assert b"\0" not in follow.out + descriptor.out


# -- inline data

def test_inline_data_files_read_their_bytes(tmp_path):
    """ext4 inline_data keeps a small file's bytes in its inode: one from mke2fs -d (in the base) and several the
    host kernel writes live, each read through the view equal to the disk's bytes (lsattr says they are inline)."""
    require_tools("lsattr")
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "base.txt").write_bytes(b"inline from mke2fs -d\n")
    with live(tmp_path / "inline", "inline_data", populate=seed) as lv:
        small = {f"small{i}.txt": b"inline file %d: %s\n" % (i, b"x" * (10 * i)) for i in range(1, 8)}
        for name, data in small.items():
            (lv.host / name).write_bytes(data)
        os.sync()
        attrs = subprocess.run(["lsattr", *(str(lv.host / n) for n in ["base.txt", *small])],
                               capture_output=True, text=True, check=True).stdout
        flags = {Path(line.split()[1]).name: line.split()[0] for line in attrs.splitlines()}
        inline = [n for n, f in flags.items() if "N" in f]
        assert "base.txt" in inline and len(inline) >= 5, attrs  # the test is about inline files
        for name in inline:
            disk = (lv.host / name).read_bytes()
            got = lv.wait(name, lambda d, want=disk: len(d) == len(want), f"{name}'s size")
            assert got == disk, (name, got, disk)

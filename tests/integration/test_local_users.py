"""Local users are outside the trust boundary (issue 9): a live attach with its mount, made with default options,
gives `nobody` nothing (no listing, no read, no connect, no TCP port), and `--group G` gives G's members the
view, the events and the subscription socket, never the writable nbd.sock, while everyone else still gets
EACCES; `--qemu-group Q` gives Q's members nbd.sock alone.

The live run is real: qemu-storage-daemon holds the disk, the host kernel writes to it through a loop mount,
`mirrorfs attach --index --mount` records it, its engine serves the FUSE view. The other users are real too:
each probe is a separate python3 run by setpriv as uid nobody with the groups the test gives it.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.mountharness import force_unmount, wait_mounted
from tests.support import require, require_root, require_tools
from tests.tapharness import Attach, mirrorfs

pytestmark = pytest.mark.integration

GROUP = 47114  # a gid no account has: the members are the probes setpriv puts in it
QGROUP = 47115  # another one, for --qemu-group (the group QEMU runs as)
PYTHON = "/usr/bin/python3"

# One probe per process: each operation's errno name, or "ok". `events.sock` must answer the subscription
# hello to count as "ok", so a connect that the server then drops is not mistaken for access.
PROBE = r"""
import errno, json, os, socket, sys
out = {}
for name, (op, path) in json.loads(sys.argv[1]).items():
    try:
        if op == "list":
            os.listdir(path)
        elif op == "stat":
            os.stat(path)
        elif op == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif op == "sqlite":  # as `events --diff` reads DIR/blobs.db: read-only, while the engine writes it
            import sqlite3
            try:
                sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("SELECT COUNT(*) FROM blob").fetchone()
            except sqlite3.Error as exc:
                raise OSError(errno.EACCES if "unable to open" in str(exc) else errno.EIO, str(exc)) from None
        elif op in ("connect", "subscribe"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(path)
                if op == "subscribe":
                    s.sendall(b"{}\n")
                    if not s.recv(4096).startswith(b'{"ok"'):
                        raise OSError(errno.EPROTO, "no hello")
            finally:
                s.close()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(out))
"""

WRITES = "echo 'guest secret' > secret.txt && mkdir -p d && echo more > d/more.txt && sync"


def probe(targets: dict[str, tuple[str, Path]], *user: str) -> dict[str, str]:
    """Run PROBE as uid nobody with the groups `user` gives setpriv (as root without), return {name: "ok" or
    errno name}."""
    arg = json.dumps({k: (op, str(p)) for k, (op, p) in targets.items()})
    proc = subprocess.run([*(["setpriv", "--reuid=nobody", *user] if user else []), PYTHON, "-c", PROBE, arg],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


NOBODY = ("--regid=nogroup", "--clear-groups")
MEMBER = ("--regid=nogroup", f"--groups={GROUP}")          # G as a supplementary group
MEMBER_PRIMARY = (f"--regid={GROUP}", "--clear-groups")    # G as the primary group
QEMU_MEMBER = ("--regid=nogroup", f"--groups={QGROUP}")    # Q as a supplementary group


def _procs_of(state: Path) -> list[int]:
    """pids whose command line names the state directory: the attach and its engine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if os.fsencode(state) in argv and any(b"mirrorfs" in a for a in argv):
                pids.append(int(entry.name))
    return pids


def _tcp_listeners(pids: list[int]) -> list[str]:
    """Listening TCP sockets (v4 and v6) held by these processes, as 'addr:port' hex from /proc/net."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                if m:
                    inodes.add(m.group(1))
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return found


def _modes(root: Path) -> dict[str, os.stat_result]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            try:
                out[str(p.relative_to(root))] = os.lstat(p)
            except FileNotFoundError:  # a temporary file of an atomic rewrite, gone since the listing
                continue
    return out


def assert_modes(root: Path, gid: int | None, qgid: int | None = None) -> None:
    """Directories 0700, files 0600, sockets 0600 (with a group: 2750, 0640, 0660, all of group gid); the
    writable nbd.sock 0600 whatever the group (0660 of group qgid with --qemu-group)."""
    want = {"dir": 0o700, "file": 0o600, "sock": 0o600} if gid is None else \
        {"dir": 0o2750, "file": 0o640, "sock": 0o660}
    want["nbd"] = 0o600 if qgid is None else 0o660
    seen = set()
    for name, st in _modes(root).items():
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "sock" if stat.S_ISSOCK(st.st_mode) else "file"
        kind = "nbd" if name == "nbd.sock" else kind
        assert not stat.S_ISLNK(st.st_mode), name
        assert stat.S_IMODE(st.st_mode) == want[kind], f"{name}: {stat.S_IMODE(st.st_mode):o}, want {want[kind]:o}"
        if kind == "nbd" and qgid is not None:
            assert st.st_gid == qgid, name
        elif gid is not None:
            assert st.st_gid == gid, name
        seen.add(kind)
        assert st.st_uid == 0, name


@pytest.fixture
def top() -> Iterator[Path]:
    """A 0711 directory in /tmp for the state directory, the index and the mount point: other users can pass
    through it, so what keeps them out below is mirrorfs's own modes, not pytest's 0700 tmp_path."""
    require_root()
    d = Path(tempfile.mkdtemp(prefix="mirrorfs-users-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    force_unmount(d / "mnt")
    shutil.rmtree(d, ignore_errors=True)


@contextmanager
def live(tmp_path: Path, top: Path, *extra: str) -> Iterator[tuple[Path, Path, Attach]]:
    """qemu-storage-daemon + `attach --index --mount` (+ extra); the host kernel writes WRITES through a loop
    mount. Yields (state, mnt, attach) once the view shows the writes; detaches at the end."""
    require_tools("qemu-storage-daemon", "losetup", "mount", "fusermount3", "setpriv")
    require(Path(PYTHON).exists(), f"{PYTHON} for the probes")
    from images.build import artifact
    from images.hostwriter import HostWriter

    base = tmp_path / "base.raw"
    shutil.copyfile(artifact("ext4.img"), base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    index = top / "vm.idx"
    mirrorfs("index", base, "-o", index)
    state, mnt = top / "state", top / "mnt"
    mnt.mkdir()
    mnt.chmod(0o755)
    attach = None
    try:
        with HostWriter(disk, tmp_path / "qsd") as hw:
            attach = Attach(hw.qmp, state, "--device", hw.node, "--index", str(index), "--mount", str(mnt), *extra,
                            log=tmp_path / "attach.log")
            attach.start()
            wait_mounted(mnt, timeout=120)
            host = hw.mount()
            proc = subprocess.run(["sh", "-c", WRITES], cwd=host, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            deadline = time.monotonic() + 120
            while not (mnt / "d" / "more.txt").exists():
                assert time.monotonic() < deadline, f"the writes never reached the view:\n{attach.output()}"
                time.sleep(0.1)
            yield state, mnt, attach
            hw.unmount()
            attach.detach()
    finally:
        if attach is not None and attach.proc is not None and attach.proc.poll() is None:
            attach.proc.kill()
            attach.proc.wait(10)
        for pid in _procs_of(state):   # an engine left behind by a failed run
            os.kill(pid, 9)
        force_unmount(mnt)


def _targets(top: Path, state: Path, mnt: Path) -> dict[str, tuple[str, Path]]:
    segments = sorted((state / "log").glob("*.wlog"))
    assert segments
    t = {
        "list state": ("list", state), "list log": ("list", state / "log"),
        "read replica.img": ("read", state / "replica.img"), "read log segment": ("read", segments[0]),
        "read events.jsonl": ("read", state / "events.jsonl"),
        "read engine/disk.img": ("read", state / "engine" / "disk.img"),
        "query blobs.db": ("sqlite", state / "blobs.db"),
        "read attach.json": ("read", state / "attach.json"), "read index": ("read", top / "vm.idx"),
        "connect nbd.sock": ("connect", state / "nbd.sock"),
        "subscribe events.sock": ("subscribe", state / "events.sock"),
        "stat mount": ("stat", mnt), "list mount": ("list", mnt), "read README in the view": ("read", mnt / "README"),
        "read secret.txt in the view": ("read", mnt / "secret.txt"),
    }
    for name, (op, path) in t.items():   # as root: everything is there and works, so EACCES means EACCES
        if op in ("read", "list", "stat", "sqlite"):
            assert path.exists(), name
        else:
            assert path.is_socket(), name
    assert probe(t) == {name: "ok" for name in t}  # root itself, through the same probe
    return t


def test_nobody_reads_and_connects_to_nothing(tmp_path, top):
    """Default options, started from a caller whose umask is 000: the state directory, its files and sockets,
    the index and the mount are root's alone, during the run and after it."""
    old = os.umask(0)
    try:
        with live(tmp_path, top) as (state, mnt, attach):
            targets = _targets(top, state, mnt)
            assert probe(targets, *NOBODY) == {name: "EACCES" for name in targets}
            # were the directory open, every file and socket would still say no: their own modes
            assert_modes(state, None)
            assert stat.S_IMODE((top / "vm.idx").stat().st_mode) == 0o600
            # no network listener of any kind by default (metrics need --metrics, NBD over tcp --listen)
            pids = _procs_of(state)
            assert len(pids) >= 2, pids      # the attach and its engine
            assert _tcp_listeners(pids) == []
            # without --group (or --allow-other) the FUSE mount is root's: a group changes nothing
            assert probe({"stat mount": ("stat", mnt)}, *MEMBER) == {"stat mount": "EACCES"}
    finally:
        os.umask(old)
    assert not (state / "nbd.sock").exists() and not (state / "events.sock").exists()
    assert_modes(state, None)  # what the detach left: still 0700/0600


def test_group_members_read_the_view_and_events_others_do_not(tmp_path, top):
    require(not any(g.gr_gid in (GROUP, QGROUP) for g in grp.getgrall()), f"gids {GROUP}, {QGROUP} are free")
    with live(tmp_path, top, "--group", str(GROUP), "--qemu-group", str(QGROUP)) as (state, mnt, attach):
        assert_modes(state, GROUP, QGROUP)
        # G reads; it can NOT connect to the writable export (it would inject writes into the log, the replica
        # and the events); only Q, the group QEMU runs as, can, once it may search the state directory
        nbd_sock = {"connect nbd.sock": ("connect", state / "nbd.sock")}
        for who in (MEMBER, MEMBER_PRIMARY, NOBODY, QEMU_MEMBER):
            assert probe(nbd_sock, *who) == {"connect nbd.sock": "EACCES"}, who
        assert f"group {QGROUP} cannot reach {state / 'nbd.sock'}: {state} is not searchable" in attach.output()
        state.chmod(0o2751)   # what the note says: search, no listing
        try:
            assert probe(nbd_sock, *QEMU_MEMBER) == {"connect nbd.sock": "ok"}
            for who in (MEMBER, MEMBER_PRIMARY, NOBODY):
                assert probe(nbd_sock, *who) == {"connect nbd.sock": "EACCES"}, who
            assert probe({"list state": ("list", state)}, *QEMU_MEMBER) == {"list state": "EACCES"}
        finally:
            state.chmod(0o2750)
        shared = {
            "list state": ("list", state), "read events.jsonl": ("read", state / "events.jsonl"),
            "query blobs.db": ("sqlite", state / "blobs.db"),
            "subscribe events.sock": ("subscribe", state / "events.sock"),
            "stat mount": ("stat", mnt), "list mount": ("list", mnt),
            "read README in the view": ("read", mnt / "README"),
            "read secret.txt in the view": ("read", mnt / "secret.txt"),
            "list d in the view": ("list", mnt / "d"), "read d/more.txt in the view": ("read", mnt / "d" / "more.txt"),
        }
        assert probe(shared) == {name: "ok" for name in shared}
        assert probe(shared, *MEMBER) == {name: "ok" for name in shared}
        assert probe(shared, *MEMBER_PRIMARY) == {name: "ok" for name in shared}
        # one who is not in G: nothing, even right after the members' lookups (no kernel cache lets it through)
        assert probe(shared, *NOBODY) == {name: "EACCES" for name in shared}
        # right after a member's lookups filled the kernel's entry and attribute caches, a non-member's stat and
        # path walk still come to the view and are refused (entries and attributes are not cached)
        member, other = (" ".join(["setpriv", "--reuid=nobody", *who]) for who in (MEMBER, NOBODY))
        # (stat -c with real fields: a statx asking for nothing gets nothing from any file system, and no error)
        race = "; ".join(f"{member} stat -c ok:%s {p} && {other} stat -c leaked:%s:%U:%Y {p} 2>&1"
                         for p in (mnt, mnt / "secret.txt", mnt / "d" / "more.txt"))
        out = subprocess.run(["sh", "-c", race], capture_output=True, text=True, timeout=60).stdout
        assert "leaked" not in out and out.count("ok") == 3 and out.count("Permission denied") == 3, out
        # members read, never write: the view stays read-only
        proc = subprocess.run(["setpriv", "--reuid=nobody", *MEMBER, "sh", "-c", f"echo x >> {mnt}/secret.txt"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0
        assert (mnt / "secret.txt").read_bytes() == b"guest secret\n"
    assert_modes(state, GROUP, QGROUP)

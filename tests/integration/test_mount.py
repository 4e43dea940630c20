"""The live FUSE view behind a real TCG guest: unmodified host tools act as agents on it.

inotifywait -m -r, tail -f / tail -F, clamscan (EICAR, test-written signature) on the mount of
`mirrorfs attach --mount` while the guest runs its workload.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.mountharness import Inotify, force_unmount, wait_mounted, wait_unmounted
from tests.support import require_root, require_tools
from tests.tapharness import Attach

pytestmark = pytest.mark.integration

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\n"

AGENTS = r"""
set -e
cd "$MNT"
sleep 2
mkdir -p work/docs
sync
sleep 1
printf 'hello\n' > work/docs/a.txt
printf 'clean file\n' > work/docs/clean.txt
printf '%s\n' 'X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*' > work/docs/eicar.com
sync
i=0
while [ $i -lt 20 ]; do echo "line $i" >> work/app.log; sync; i=$((i + 1)); done
mv work/docs/a.txt work/docs/b.txt
sync
ln work/docs/b.txt work/hard
ln -s docs/b.txt work/sym
mkfifo work/fifo
sync
chmod 600 work/docs/b.txt
sync
rm work/hard
rm work/docs/clean.txt
sync
echo end > work/END
sync
"""


def events_of(state: Path) -> list[dict]:
    path = state / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@contextmanager
def live_view(tmp_path: Path, workload: str, image: str = "ext4.img", *extra: str,
              prepare: Callable[[Path], None] | None = None):
    """A paused TCG guest, `attach --cont --base --mount [EXTRA]`; yields (guest, attach, mnt, state, disk).
    `prepare(base)` may change the base image before the guest's disk is copied from it."""
    from images.build import artifact
    from images.guest import Guest

    require_root()
    require_tools("qemu-system-x86_64", "fusermount3", "inotifywait")
    base = tmp_path / "base.raw"
    shutil.copyfile(artifact(image), base)
    if prepare is not None:
        prepare(base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    mnt.mkdir()
    try:
        with Guest(disk, workload, tmp_path / "vm", paused=True) as guest:
            with Attach(guest.qmp, state, "--cont", "--base", str(base), "--mount", str(mnt), *extra) as attach:
                wait_mounted(mnt, timeout=120)
                yield guest, attach, mnt, state, disk
    finally:
        force_unmount(mnt)


def wait_quiet(mnt: Path, state: Path, marker: str, timeout: float = 120, settle: float = 2.0) -> None:
    """Until `marker` is in the view and the event log has not grown for `settle` seconds."""
    deadline = time.monotonic() + timeout
    while not (mnt / marker).exists():
        assert time.monotonic() < deadline, f"{marker} never appeared in the view"
        time.sleep(0.1)
    last, since = -1, time.monotonic()
    while time.monotonic() - since < settle:
        n = len(events_of(state))
        if n != last:
            last, since = n, time.monotonic()
        time.sleep(0.1)


PRIMARY = ("CREATE", "DELETE", "MOVED_FROM", "MOVED_TO", "MODIFY", "ATTRIB", "CLOSE_WRITE")


def expected_inotify(m: dict) -> list[tuple[str, str]]:
    """The kernel events one mutation must raise (the primary ones, as (event, path))."""
    p = m["path"].lstrip("/")
    kind, isdir = m["kind"], m.get("type") == "dir"
    if kind == "create":
        return [("CREATE", p), ("CLOSE_WRITE", p)]
    if kind in ("mkdir", "symlink", "mknod", "link"):
        return [("CREATE", p)]
    if kind in ("delete", "rmdir"):
        return [("DELETE", p)]
    if kind == "rename":
        return [("MOVED_FROM", m["old_path"].lstrip("/")), ("MOVED_TO", p)]
    if kind in ("modify", "truncate"):
        return [("MODIFY", p), ("CLOSE_WRITE", p)]
    if kind in ("attrib", "xattr"):
        return [("ATTRIB", p)]
    assert not isdir
    return []


# what may stand between a new file's create and its content change for the two to be one write (poke.RIDE_OVER)
RIDE_OVER = ("create", "mkdir", "symlink", "mknod", "modify")


def expected_sequence(mutations: list[dict]) -> list[tuple[dict, list[tuple[str, str]]]]:
    """Each mutation with the kernel events it must raise, in order. A new file's content change that comes with
    the same point as its create, with only other files' creates and modifies between them, is replayed with the
    create as one open(O_CREAT|O_EXCL) + ftruncate + close: CREATE, MODIFY, CLOSE_WRITE at the create's place (as
    the guest's own creat + write + close raised them), nothing at its own."""
    out: list[tuple[dict, list[tuple[str, str]]]] = []
    creates: dict[tuple, int] = {}  # (fs, ino) -> index in out of a create a modify may still join
    for m in mutations:
        key = (m.get("fs"), m.get("ino"))
        if m["kind"] == "create":
            creates[key] = len(out)
        elif m["kind"] not in RIDE_OVER:
            creates.clear()
        elif m["kind"] == "modify" and key in creates:
            i = creates.pop(key)
            c = out[i][0]
            if c["path"] == m["path"] and c["seq"] == m["seq"]:
                p = c["path"].lstrip("/")
                out[i] = (c, [("CREATE", p), ("MODIFY", p), ("CLOSE_WRITE", p)])
                out.append((m, []))
                continue
        out.append((m, expected_inotify(m)))
    return out


def primary(events: list[tuple[float, str, str, str]]) -> list[tuple[float, str, str, str]]:
    out = []
    for t, ev, path, cookie in events:
        kinds = ev.split(",")
        for k in PRIMARY:
            if k in kinds:
                out.append((t, k, path.rstrip("/"), cookie))
    return out


def test_agents_on_the_live_view(tmp_path):
    """inotifywait -m -r sees every flushed operation in order; tail -f / -F see every line; clamscan finds EICAR."""
    require_tools("clamscan", "tail")
    db = tmp_path / "eicar.hdb"
    db.write_text(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Mirrorfs.Test.EICAR\n")
    tails: dict[str, subprocess.Popen] = {}
    with live_view(tmp_path, AGENTS) as (guest, attach, mnt, state, disk):
        ino = Inotify(mnt)
        try:
            deadline = time.monotonic() + 120
            while not (mnt / "work" / "app.log").exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for name, opts in (("f", ["-f"]), ("F", ["-F", "--max-unchanged-stats=1"])):
                out = open(tmp_path / f"tail-{name}.out", "w")
                tails[name] = subprocess.Popen(["tail", "-n", "+1", *opts, str(mnt / "work" / "app.log")],
                                               stdout=out, stderr=subprocess.STDOUT)
            from images.guest import DONE
            guest.wait_for(DONE + " rc=0", timeout=300)
            wait_quiet(mnt, state, "work/END")
            time.sleep(1.5)  # tail polls once a second
            scan = subprocess.run(["clamscan", "-r", "--no-summary", "-d", str(db), str(mnt)],
                                  capture_output=True, text=True, timeout=300)
        finally:
            for proc in tails.values():
                proc.terminate()
                proc.wait(10)
            ino.stop()
        attach.detach()
    wait_unmounted(mnt)

    # clamscan: the EICAR file the guest wrote, and nothing else
    found = [line for line in scan.stdout.splitlines() if line.endswith("FOUND")]
    assert scan.returncode == 1, scan.stdout + scan.stderr
    assert found == [f"{mnt}/work/docs/eicar.com: Mirrorfs.Test.EICAR.UNOFFICIAL FOUND"], scan.stdout

    # tail -f and tail -F: every line the guest appended
    want = [f"line {i}" for i in range(20)]
    for name in tails:
        got = (tmp_path / f"tail-{name}.out").read_text().splitlines()
        assert got == want, (name, got)

    # inotifywait: the mutations' kernel events, in order, and the workload's operations among them
    mutations = [m for m in events_of(state) if m["kind"] != "error"]
    assert mutations, "the engine saw nothing"
    expected = expected_sequence(mutations)
    want_ev = [e for _, evs in expected for e in evs]
    got = primary(ino.events())
    (tmp_path / "inotify.txt").write_text("\n".join(map(str, ino.lines)) + "\n")
    (tmp_path / "want.txt").write_text("\n".join(map(str, want_ev)) + "\n")
    assert [(k, p) for _, k, p, _ in got] == want_ev
    cookies = {(k, p): c for _, k, p, c in got if k.startswith("MOVED")}
    assert cookies[("MOVED_FROM", "work/docs/a.txt")] == cookies[("MOVED_TO", "work/docs/b.txt")] != "0"
    # the workload's operations, in order from one sync to the next (inside one transaction any order is right)
    groups = [{("CREATE", "work/docs/a.txt"), ("CREATE", "work/docs/clean.txt"), ("CREATE", "work/docs/eicar.com")},
              {("CREATE", "work/app.log")}, {("MOVED_FROM", "work/docs/a.txt"), ("MOVED_TO", "work/docs/b.txt")},
              {("CREATE", "work/hard"), ("CREATE", "work/sym"), ("CREATE", "work/fifo")},
              {("ATTRIB", "work/docs/b.txt")}, {("DELETE", "work/hard"), ("DELETE", "work/docs/clean.txt")},
              {("CREATE", "work/END")}]
    seq = [(k, p) for _, k, p, _ in got]
    last_of = [max(seq.index(op) for op in g) for g in groups]
    first_of = [min(seq.index(op) for op in g) for g in groups]
    assert all(last_of[i] < first_of[i + 1] for i in range(len(groups) - 1)), seq
    assert sum(1 for e in seq if e == ("MODIFY", "work/app.log")) >= 2

    # delay from mutation (the record that completed it reached the tap) to its first inotify event
    delays, i = [], 0
    for m, exp in expected:
        if exp:
            delays.append(got[i][0] - m["time"])
            i += len(exp)
    report = {"mutations": len(delays), "median_ms": round(statistics.median(delays) * 1000, 1),
              "p99_ms": round(sorted(delays)[int(0.99 * (len(delays) - 1))] * 1000, 1),
              "max_ms": round(max(delays) * 1000, 1)}
    print("mutation->inotify delay:", report)
    (tmp_path / "delay.json").write_text(json.dumps(report))
    assert report["p99_ms"] < 5000

"""AIDE and Tripwire on the live view at T and T' report exactly what they report on a loop mount of the
guest's final disk; e2fsprogs' chattr in the guest (`+i`, `+a`, `-i`) gives one attrib event each, naming
the flags before and after (issue 17); and a burst of 10,000 mutations loses no inotify event while `ls`
stays responsive."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_mount import events_of, live_view, wait_quiet
from tests.mountharness import Inotify, Tripwire, wait_unmounted
from tests.support import require_tools

pytestmark = pytest.mark.integration

CHANGES = r"""
set -e
cd "$MNT"
sleep 2
mkdir -p work
echo a > work/keep; echo b > work/change; echo c > work/gone; ln -s keep work/sym; ln work/keep work/hard
sync
echo phase1 > work/PHASE1
sync
sleep 30
echo more >> work/change; rm work/gone; echo new > work/new; chmod 600 work/keep; mkdir work/d
mv work/sym work/d/sym2; touch -d '2001-02-03 04:05:06' work/hard
sync
chattr +i work/change
sync
chattr +a work/new
sync
chattr -i work/change
sync
echo end > work/END
sync
"""

VOLATILE = re.compile(r"timestamp|run time|Report created|Database last updated|Report generated|Wall time|"
                      r"Host name|Host IP|Host ID|Command line|Report file|Database file used|Policy file used|"
                      r"Configuration file used|Start time|End time|^AIDE|Open Source Tripwire\(R\) \d|"
                      r"Total objects scanned|Total violations found", re.I)


def _stable(report: str) -> list[str]:
    return [line.rstrip() for line in report.splitlines() if line.strip() and not VOLATILE.search(line)]


class Aide:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.conf = work / "aide.conf"
        self.conf.write_text(f"database_in=file:{work}/aide.db\ndatabase_out=file:{work}/aide.db.new\n"
                             "report_url=stdout\nTree = p+i+n+u+g+s+b+m+c+xattrs+acl+sha256\n/ Tree\n")

    def init(self, root: Path) -> None:
        subprocess.run(["aide", "--init", "-c", str(self.conf), "-B", f"root_prefix={root}"], check=True,
                       capture_output=True, timeout=300)
        (self.work / "aide.db.new").rename(self.work / "aide.db")

    def check(self, root: Path) -> tuple[int, str]:
        p = subprocess.run(["aide", "--check", "-c", str(self.conf), "-B", f"root_prefix={root}"],
                           capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout


def test_aide_and_tripwire_on_the_view_match_the_final_disk(tmp_path):
    require_tools("aide", "tripwire", "twadmin", "twprint", "mount", "umount")
    from images.guest import DONE

    work = tmp_path / "agents"
    work.mkdir()
    aide = Aide(work)
    with live_view(tmp_path, CHANGES) as (guest, attach, mnt, state, disk):
        # Debian's SEC_CRIT less `d`, the device number, which differs between mounts (issue 17)
        tw = Tripwire(work, f'(rulename = "view") {{\n  {mnt} -> $(IgnoreNone)-SHad ;\n}}\n')
        wait_quiet(mnt, state, "work/PHASE1")
        t0 = time.monotonic()
        aide.init(mnt)
        tw.init()
        assert time.monotonic() - t0 < 25, "init took longer than the guest waits"
        guest.wait_for(DONE + " rc=0", timeout=300)
        wait_quiet(mnt, state, "work/END", settle=3)
        view_aide = aide.check(mnt)
        view_tw = tw.check("view")
        attach.detach()
    wait_unmounted(mnt)
    final = tmp_path / "final.raw"
    shutil.copyfile(disk, final)
    subprocess.run(["mount", "-o", "ro,loop", str(final), str(mnt)], check=True)  # replays the journal in memory
    try:
        loop_aide = aide.check(mnt)
        loop_tw = tw.check("loop")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    flagged = [(e["path"], e["flags"], e["old_flags"]) for e in events_of(state)
               if e["kind"] == "attrib" and "old_flags" in e]
    assert flagged == [("/work/change", ["immutable"], []), ("/work/new", ["append"], []),
                       ("/work/change", [], ["immutable"])], flagged
    (tmp_path / "reports.txt").write_text("\n=====\n".join(x[1] for x in (view_aide, loop_aide, view_tw, loop_tw)))
    assert view_aide[0] == loop_aide[0] == 7, view_aide[1]  # added, removed and changed entries
    assert _stable(view_aide[1]) == _stable(loop_aide[1])
    assert "/work/gone" in view_aide[1] and "/work/new" in view_aide[1]
    assert view_tw[0] == loop_tw[0] != 0, view_tw[1]
    # same lines; Tripwire lists objects in readdir order, which the view cannot know from the guest's blocks
    assert sorted(_stable(view_tw[1])) == sorted(_stable(loop_tw[1]))


BURST = r"""
set -e
cd "$MNT"
sleep 2
mkdir -p burst
cd burst
seq 0 99 | sed 's/^/d/' | xargs mkdir
sync
sleep 3
for d in $(seq 0 99); do cd d$d; seq 1 100 | sed 's/^/f/' | xargs touch; cd ..; done
sync
echo end > ../BURST_END
sync
"""


def test_burst_of_10000_mutations_loses_no_event_and_ls_stays_responsive(tmp_path):
    require_tools("ls")
    from images.guest import DONE

    lat: list[float] = []
    stop = threading.Event()
    with live_view(tmp_path, BURST) as (guest, attach, mnt, state, disk):
        ino = Inotify(mnt)

        def sample() -> None:
            while not stop.is_set():
                t = time.monotonic()
                subprocess.run(["ls", "-R", str(mnt / "burst") if (mnt / "burst").exists() else str(mnt)],
                               capture_output=True, timeout=60)
                lat.append(time.monotonic() - t)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            guest.wait_for(DONE + " rc=0", timeout=400)
            wait_quiet(mnt, state, "BURST_END", timeout=300, settle=3)
        finally:
            stop.set()
            sampler.join(60)
            ino.stop()
        attach.detach()
    events = ino.events()
    assert not [e for e in events if "Q_OVERFLOW" in e[1]]
    # 100 directories of 100 files each
    created = {p for _, ev, p, _ in events if ev == "CREATE" and p.startswith("burst/")}
    assert created == {f"burst/d{d}/f{i}" for d in range(100) for i in range(1, 101)}
    closes = sum(1 for _, ev, p, _ in events if ev.startswith("CLOSE_WRITE") and p.startswith("burst/"))
    assert closes == 10000
    print(f"ls during the burst: {len(lat)} runs, max {max(lat) * 1000:.0f} ms, "
          f"median {sorted(lat)[len(lat) // 2] * 1000:.0f} ms")
    assert max(lat) < 2.0

"""`make demo`: a bundled demo VM watched by mirrorfs, end to end, with real QEMU.

Boots the test guest paused with a workload that appends a log line every second and creates, renames
and deletes files for DEMO_SECONDS, then powers off; attaches mirrorfs with the live engine and the
read-only mount (`--cont` resumes the guest once the mirror is ready, so nothing is missed); shows the
mutation events, `inotifywait -m -r` and `tail -F` on the mount as they happen; then detaches, and
checks that tail printed every heartbeat, whole, in order, with no NUL, and that the replica rebuilt from the
write log equals the guest's final disk byte for byte (the exit status says whether both hold).
Ctrl-C ends early (detaching cleanly; the comparison is skipped since the guest was still writing).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from images.build import artifact, cache_dir
from images.guest import Guest

WORKLOAD = r"""
mkdir -p "$MNT/var/log" "$MNT/home/demo"
i=0
while [ $i -lt SECONDS ]; do
  i=$((i + 1))
  echo "$(date '+%Y-%m-%d %H:%M:%S') demo[$$]: heartbeat $i" >> "$MNT/var/log/demo.log"
  case $((i % 6)) in
    1) echo "draft $i" > "$MNT/home/demo/note-$i.txt" ;;
    3) mv "$MNT/home/demo/note-$((i - 2)).txt" "$MNT/home/demo/final-$((i - 2)).txt" ;;
    5) rm -f "$MNT/home/demo/final-$((i - 10)).txt" ;;
  esac
  [ $((i % 10)) -eq 0 ] && sync
  sleep 1
done
"""


def say(msg: str) -> None:
    print(f"\033[1mdemo:\033[0m {msg}" if sys.stdout.isatty() else f"demo: {msg}", flush=True)


class Printed:
    """The lines a watcher printed, for the demo's own check; `wait` wakes on each new line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()

    def add(self, line: str) -> None:
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.lines) >= count, timeout)


def show(prefix: str, cmd: list[str], keep: Printed | None = None) -> subprocess.Popen:
    """Run a watcher and print its lines with a prefix (a thread per stream: they share the terminal); with
    `keep`, its standard output's lines are kept there too (not its messages on stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if keep is None else subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)

    def pump(stream, into: Printed | None) -> None:
        for line in stream:
            print(f"{prefix:<9}| {line.rstrip(chr(10))}", flush=True)
            if into is not None:
                into.add(line.rstrip("\n"))

    threading.Thread(target=pump, args=(proc.stdout, keep), daemon=True).start()
    if keep is not None:
        threading.Thread(target=pump, args=(proc.stderr, None), daemon=True).start()
    return proc


HEARTBEAT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d demo\[\d+\]: heartbeat (\d+)")


def check_tail(lines: list[str], count: int) -> str | None:
    """What is wrong with tail's output, if anything: it must be the log's heartbeats 1..count, each whole, in
    order, no NUL (the mount never shows bytes the guest has not written)."""
    if any("\0" in x for x in lines):
        return f"{sum(x.count(chr(0)) for x in lines)} NUL bytes in tail's output"
    numbers = []
    for x in lines:
        m = HEARTBEAT.fullmatch(x)
        if m is None:
            return f"tail printed {x!r}, not a heartbeat line"
        numbers.append(int(m.group(1)))
    if numbers != list(range(1, count + 1)):
        return f"tail printed heartbeats {numbers}, not 1..{count} in order"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m images.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60, help="how long the guest works (default 60; Ctrl-C ends "
                                                               "earlier)")
    ap.add_argument("--mode", choices=["exact", "async"], default="exact", help="mirror copy mode")
    ap.add_argument("--keep", action="store_true", help="keep the demo directory (disk, state dir) afterwards")
    ap.add_argument("--workdir", type=Path, help="where to make the demo directory (default: the image cache)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="demo-", dir=args.workdir or cache_dir()))
    base, disk, state, mnt = work / "base.raw", work / "vm1.raw", work / "state", work / "mnt"
    mnt.mkdir()
    say(f"preparing the demo VM in {work}")
    shutil.copyfile(artifact("ext4.img"), base)
    shutil.copyfile(base, disk)
    mirrorfs = [sys.executable, "-m", "mirrorfs.cli"]
    attach = None
    watchers: list[subprocess.Popen] = []
    interrupted = False
    heartbeats = max(int(args.seconds), 1)
    tail = Printed()
    tail_wrong: str | None = "not checked"
    try:
        workload = WORKLOAD.replace("SECONDS", str(heartbeats))
        with Guest(disk, workload, work / "vm", paused=True) as guest:
            say(f"guest QEMU pid {guest.pid} started paused; attaching mirrorfs ({args.mode} mode), "
                f"live view on {mnt}")
            attach = subprocess.Popen([*mirrorfs, "attach", "--qmp", str(guest.qmp), "--state", str(state),
                                       "--mode", args.mode, "--cont", "--base", str(base), "--mount", str(mnt)],
                                      start_new_session=True)
            deadline = time.monotonic() + 120
            while not (mnt / "lost+found").exists():  # ready, engine indexed, view mounted
                if attach.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("demo: mirrorfs attach failed (see its message above)")
                time.sleep(0.1)
            say(f"the guest works for {args.seconds:.0f} s; three host tools watch it (Ctrl-C ends):")
            say("  events   = mirrorfs events --follow        (the mutation stream)")
            say(f"  inotify  = inotifywait -m -r {mnt}   (an unmodified tool on the read-only mount)")
            say(f"  tail     = tail -F {mnt}/var/log/demo.log")
            watchers.append(show("events", [*mirrorfs, "events", "--state", str(state), "--follow"]))
            watchers.append(show("inotify", ["inotifywait", "-m", "-r", "-q", "-e", "create,modify,close_write,delete,"
                                             "moved_from,moved_to,attrib", str(mnt)]))
            watchers.append(show("tail", ["tail", "-F", "--max-unchanged-stats=1", "-n", "+1",
                                          str(mnt / "var/log/demo.log")], tail))
            try:
                guest.wait_for("reboot: Power down", timeout=args.seconds * 3 + 120)
                tail.wait(heartbeats, 60)  # the guest's last sync reaches the view, then tail (polling each 1 s)
                tail_wrong = check_tail(tail.lines, heartbeats)
            except KeyboardInterrupt:
                interrupted = True
                print()
            say("detaching (block-job-cancel; the guest stays on its own disk)")
            for w in watchers:
                w.terminate()
            attach.send_signal(signal.SIGINT)
            attach.wait(180)
            guest.stop()
        if interrupted:
            return 130
        say("guest powered off; rebuilding its disk from the write log")
        replica = work / "replica.raw"
        subprocess.run([*mirrorfs, "replica", "--state", str(state), "--base", str(base), "-o", str(replica)],
                       check=True)
        records = subprocess.run([*mirrorfs, "log", "--state", str(state)], capture_output=True, text=True,
                                 check=True).stdout.count("\n")
        events = (state / "events.jsonl").read_text().count("\n")
        same = subprocess.run(["cmp", "-s", str(replica), str(disk)]).returncode == 0
        say(f"{records} write records, {events} mutation events; replica {'==' if same else '!='} guest disk "
            "(byte for byte)")
        say(f"tail -F printed heartbeats 1..{heartbeats} in order, whole, no NUL" if tail_wrong is None
            else f"tail -F's output is wrong: {tail_wrong}")
        return 0 if same and tail_wrong is None else 1
    except KeyboardInterrupt:
        interrupted = True
        return 130
    finally:
        for proc in (*watchers, attach):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        subprocess.run([*mirrorfs, "umount", str(mnt)], capture_output=True)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        if interrupted:
            say("interrupted")


if __name__ == "__main__":
    sys.exit(main())

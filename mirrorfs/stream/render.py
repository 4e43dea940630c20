"""An event as a line for a terminal or a pipe: `events`, `collect` and the CLI's printing share it."""

from __future__ import annotations

import datetime as dt
import stat
import time

from inference.names import escape_name as esc


def format_time(t: float, timefmt: str | None) -> str:
    """The text format's time stamp: %H:%M:%S local (default), `iso` (ISO-8601, local, with microseconds and
    the zone's offset) or any strftime(3) format, as inotifywait --timefmt takes."""
    if timefmt is None:
        return time.strftime("%H:%M:%S", time.localtime(t))
    if timefmt == "iso":
        return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="microseconds")
    return dt.datetime.fromtimestamp(t).astimezone().strftime(timefmt)


def format_event(ev, as_json: bool, timefmt: str | None = None) -> str:
    """One event as a line: JSON (names lossless, see mirrorfs-events(5)), or text for a terminal, where every
    string that may come from a guest or another host is escaped as `ls -b` does (no raw control bytes)."""
    if as_json:
        return ev.to_json()
    stamp = format_time(ev.time, timefmt) if isinstance(ev.time, int | float) else "?"
    what = f"{esc(ev.old_path)} -> {esc(ev.path)}" if ev.old_path else esc(ev.path)
    if ev.is_error:
        what = f"{esc(ev.path)}: {esc(ev.message)}"
    elif ev.target is not None:
        what += f" -> {esc(ev.target)}"
    if ev.ranges:
        what += " [" + esc(",".join(f"{a}-{b}" for a, b in ev.ranges[:4])) + ("…" if len(ev.ranges) > 4 else "") + "]"
    if ev.diff_skipped is not None:
        what += f" (no diff: {esc(ev.diff_skipped)})"
    line = f"{esc(ev.seq):>8} {stamp} {esc(ev.fs) or '-':<6} {esc(ev.kind):<8} {what}"
    if isinstance(ev.diff, str) and ev.diff:
        line += format_diff(ev.diff)
    return line


def format_diff(diff: str, indent: str = "    ") -> str:
    """A --diff under its event's line, indented: each line escaped as names are (a guest's file may hold ESC
    sequences, carriage returns, bidi overrides), so the diff cannot drive the terminal or forge other lines."""
    return "".join(f"\n{indent}{esc(line)}" for line in diff.removesuffix("\n").split("\n"))


_TYPE_LETTER = {"file": "r", "dir": "d", "symlink": "l", "chardev": "c", "blockdev": "b", "fifo": "p",
                "socket": "s"}
_TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "chardev": stat.S_IFCHR,
              "blockdev": stat.S_IFBLK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}


def format_bodyfile(ev) -> str | None:
    """One event as a line of The Sleuth Kit's body format (TSK 3: MD5|name|inode|mode_as_string|UID|GID|size|
    atime|mtime|ctime|crtime), for mactime(1) timelines; None for an error event. MD5 is 0 (events carry SHA-256),
    crtime 0 (not in events); a delete's name ends in " (deleted)" as fls(1) writes it, a rename's is the new
    path. Names are escaped as `ls -b` does, and '|' as '\\|', so a guest's name cannot break the line."""
    if ev.is_error:
        return None
    name = esc(ev.path).replace("|", "\\|")
    if ev.kind in ("delete", "rmdir"):
        name += " (deleted)"
    elif ev.type == "symlink" and ev.target is not None:
        name += " -> " + esc(ev.target).replace("|", "\\|")
    letter = _TYPE_LETTER.get(ev.type, "-")
    mode = f"{letter}/{letter}{stat.filemode(_TYPE_BITS.get(ev.type, 0) | (ev.mode or 0))[1:]}"
    secs = [str(int(ns // 1_000_000_000)) if ns is not None else "0" for ns in (ev.atime_ns, ev.mtime_ns, ev.ctime_ns)]
    return "|".join(["0", name, str(ev.ino or 0), mode, str(ev.uid or 0), str(ev.gid or 0), str(ev.size or 0),
                     *secs, "0"])

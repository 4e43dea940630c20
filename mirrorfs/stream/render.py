"""An event as a line for a terminal or a pipe: `events`, `collect` and the CLI's printing share it."""

from __future__ import annotations

import time

from inference.names import escape_name as esc


def format_event(ev, as_json: bool) -> str:
    """One event as a line: JSON (names lossless, see mirrorfs-events(5)), or text for a terminal, where every
    string that may come from a guest or another host is escaped as `ls -b` does (no raw control bytes)."""
    if as_json:
        return ev.to_json()
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.time)) if isinstance(ev.time, int | float) else "?"
    what = f"{esc(ev.old_path)} -> {esc(ev.path)}" if ev.old_path else esc(ev.path)
    if ev.is_error:
        what = f"{esc(ev.path)}: {esc(ev.message)}"
    elif ev.target is not None:
        what += f" -> {esc(ev.target)}"
    if ev.ranges:
        what += " [" + esc(",".join(f"{a}-{b}" for a, b in ev.ranges[:4])) + ("…" if len(ev.ranges) > 4 else "") + "]"
    return f"{esc(ev.seq):>8} {stamp} {esc(ev.fs) or '-':<6} {esc(ev.kind):<8} {what}"

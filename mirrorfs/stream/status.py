"""`mirrorfs status`: what an operator asks first about one state directory, in one screen."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from inference.eventlog import last_position
from inference.names import escape_name as esc
from mirrorfs.stream.metrics import log_bytes
from tap.state import StateDir, read_json


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def gather_status(state_dir: Path) -> dict[str, Any]:
    state = StateDir(state_dir)
    st = state.require_state()
    attach = state.read_attach() or {}
    total, sizes = log_bytes(state.log)
    info: dict[str, Any] = {"state": str(state.path), "disk_bytes": st.get("size"), "device": st.get("device"),
                            "log_bytes": total, "log_segments": len(sizes)}
    info["attach"] = {
        "running": _alive(attach.get("pid")) and not attach.get("detached"),
        "pid": attach.get("pid"), "mode": attach.get("mode"), "sync": attach.get("sync"),
        "ready": attach.get("ready"), "last_seq": attach.get("last_seq"), "writes": attach.get("writes"),
        "updated": attach.get("updated"), "detached": attach.get("detached"),
    } if attach else None
    from tap.writelog import last_seq
    info["log_last_seq"] = last_seq(state.log) if sizes else 0
    from tap.retention import current
    ck = current(state.path)
    info["checkpoint"] = {"seq": ck.seq, "time": ck.time_ns / 1e9, "index": ck.index is not None} if ck else None
    events = state.path / "events.jsonl"
    if events.exists():
        seq, n = last_position(events)
        info["events"] = {"count": _count_lines(events), "last_id": f"{seq}-{n}" if seq or n else None,
                          "last_seq": seq, "bytes": events.stat().st_size,
                          "lag_records": max(info["log_last_seq"] - seq, 0)}
    else:
        info["events"] = None
    pub = read_json(state.path / "publish.json")
    info["publish"] = pub.get("streams") if pub else None
    from mirrorfs.stream.server import socket_path
    info["subscription_socket"] = str(socket_path(state.path)) if socket_path(state.path).is_socket() else None
    return info


def _ago(t: Any) -> str:
    return f"{time.time() - t:.0f} s ago" if isinstance(t, int | float) else "?"


def format_status(info: dict[str, Any]) -> str:
    """The text form; strings read from the state directory (paths, device, stream names) are escaped as `ls -b`
    does, so nothing in them reaches the terminal as a control sequence."""
    mib = 1 << 20
    lines = [f"state      {esc(info['state'])}",
             f"disk       {esc(info.get('device')) or '?'}, {(info.get('disk_bytes') or 0) / mib:.0f} MiB"]
    a = info.get("attach")
    if a is None:
        lines.append("attach     never attached")
    else:
        what = "running" if a["running"] else ("detached " + _ago(a["detached"]) if a["detached"] else "not running")
        lines.append(f"attach     {what} (pid {esc(str(a['pid']))}, mode {esc(str(a['mode']))}, "
                     f"sync {esc(str(a['sync']))}, "
                     f"{'ready' if a['ready'] else 'not ready'}, updated {_ago(a['updated'])})")
    lines.append(f"write log  {info['log_bytes'] / mib:.1f} MiB in {info['log_segments']} segment(s), "
                 f"last seq {info['log_last_seq']}")
    ck = info.get("checkpoint")
    if ck:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ck["time"]))
        lines.append(f"history    from seq {ck['seq']} ({when}): what came before was folded into a checkpoint "
                     "(attach --retain)")
    ev = info.get("events")
    if ev is None:
        lines.append("events     none (no engine has run: attach with --base/--index, or mirrorfs replay)")
    else:
        lines.append(f"events     {ev['count']} ({ev['bytes'] / 1024:.0f} KiB), last {esc(ev['last_id']) or '-'}; "
                     f"engine lag {ev['lag_records']} records (to its last event's seq)")
    for name, p in (info.get("publish") or {}).items():
        lines.append(f"publish    {esc(name)} on {esc(str(p.get('redis')))}: after {esc(str(p.get('after')))}, "
                     f"updated {_ago(p.get('updated'))}")
    if info.get("subscription_socket"):
        lines.append(f"subscribe  {esc(info['subscription_socket'])}")
    return "\n".join(lines)

"""Running under systemd: readiness notification (Type=notify) and the template unit with this installation's
absolute path (`mirrorfs install-unit`). See mirrorfs(1) SYSTEMD."""

from __future__ import annotations

import os
import socket
import sys
from importlib.resources import files
from pathlib import Path

UNIT = "mirrorfs@.service"


def notify(state: str) -> bool:
    """sd_notify(3): tell the service manager `state` ("READY=1", "STOPPING=1", "STATUS=..."). Nothing to do (and
    False) outside a Type=notify unit. NOTIFY_SOCKET is a path, or an abstract name when it starts with '@'."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where or where[0] not in "/@":
        return False
    addr = "\0" + where[1:] if where[0] == "@" else where
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError:
        return False


def render_unit() -> str:
    """The template unit, run by this very installation: its Python and its package, by absolute path."""
    text = files("mirrorfs").joinpath("data", UNIT).read_text()
    return text.replace("@MIRRORFS@", f"{Path(sys.executable).absolute()} -m mirrorfs.cli")


def install_unit(directory: Path) -> Path:
    """Write the rendered unit into `directory` (mode 0644, replaced atomically); its path."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / UNIT
    tmp = out.with_name(f".{UNIT}.tmp")
    tmp.write_text(render_unit())
    tmp.chmod(0o644)
    tmp.replace(out)
    return out

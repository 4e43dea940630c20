"""`make demo` (images/demo.py), as a user runs it: `tail -F` on the mount prints the guest's heartbeat lines, whole
and in order, with no NUL, and nothing the guest wrote is missing.

The demo's guest appends a heartbeat a second and syncs only every ten (and at its end), so its ext4 commits sizes
ahead of their bytes in between: the case where `tail -F` used to print runs of NULs (issue 10).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, require_root, require_tools

pytestmark = pytest.mark.integration

SECONDS = 15
PREFIX = "tail     | "


def test_demo_tail_prints_every_heartbeat_in_order(tmp_path: Path) -> None:
    require_root()
    require_tools("qemu-system-x86_64", "fusermount3", "inotifywait", "tail", "debugfs", "cmp")
    p = subprocess.run([sys.executable, "-m", "images.demo", "--seconds", str(SECONDS), "--workdir", str(tmp_path),
                        "--keep"], cwd=REPO, capture_output=True, timeout=SECONDS * 4 + 400)
    out = p.stdout.decode(errors="replace")
    (tmp_path / "demo.out").write_bytes(p.stdout + b"\n--- stderr\n" + p.stderr)
    tail = [x[len(PREFIX):] for x in out.split("\n") if x.startswith(PREFIX)]
    tail = [x for x in tail if not x.startswith("tail: ")]  # its messages ("has appeared"), from its stderr
    assert tail, f"the demo printed no tail lines:\n{out[-3000:]}"
    assert not [x for x in tail if "\0" in x], f"tail printed NUL bytes (see {tmp_path}/demo.out)"
    numbers = []
    for x in tail:
        m = re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d demo\[\d+\]: heartbeat (\d+)", x)
        assert m, f"tail printed {x!r}, not a whole heartbeat line (see {tmp_path}/demo.out)"
        numbers.append(int(m.group(1)))
    assert numbers == list(range(1, len(numbers) + 1)), f"heartbeats out of order or missing: {numbers}"
    # what the guest wrote (its final disk, kept): tail printed all of it, byte for byte
    (disk,) = tmp_path.glob("demo-*/vm1.raw")
    log = subprocess.run(["debugfs", "-R", "cat /var/log/demo.log", str(disk)], capture_output=True,
                         check=True).stdout.decode()
    assert log.count("\n") == SECONDS, log
    assert "\n".join(tail) + "\n" == log, f"tail printed {len(tail)} lines, the guest's log has {SECONDS}"
    assert "replica == guest disk" in out and "in order, whole, no NUL" in out, out[-3000:]
    assert p.returncode == 0, out[-3000:]

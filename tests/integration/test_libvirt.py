"""`attach --domain` against a real libvirtd running a TCG domain of the test guest.

The test runs its own libvirtd (tests/libvirtharness.py); libvirt runs QEMU as libvirt-qemu, so the attach must
give nbd.sock to that group and make its directory reachable.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvirtharness import NAME, Libvirt
from tests.mountharness import force_unmount, wait_mounted
from tests.support import require, require_root, require_tools
from tests.tapharness import MIRRORFS, Attach, mirrorfs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def libvirt_domain() -> Iterator[Libvirt]:
    require_root()
    require_tools("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "unshare")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        require(False, "libvirt-python is not installed")
    lv = Libvirt()
    try:
        yield lv
    finally:
        lv.close()


def _attach(lv: Libvirt, state: Path, *extra: str) -> Attach:
    a = Attach(Path("/nonexistent/qmp"), state)
    a.args = [*MIRRORFS, "attach", "--domain", NAME, "--connect", lv.uri, "--state", str(state), *extra]
    return a


def _events(state: Path) -> list[dict]:
    path = state / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_attach_by_name_events_and_mount_then_detach_leaves_domain_on_its_disk(libvirt_domain: Libvirt,
                                                                            tmp_path: Path) -> None:
    lv = libvirt_domain
    state, mnt = lv.dir / "state", tmp_path / "mnt"
    mnt.mkdir()
    attach = _attach(lv, state, "--disk", "vda", "--cont", "--mount", str(mnt))
    try:
        with attach:
            # the job is libvirt's own: virsh sees it, and the domain is not tainted by a monitor command
            assert "Block Copy" in lv.virsh("blockjob", NAME, "vda", "--info")
            wait_mounted(mnt, attach.proc, timeout=60)
            lv.wait_console("MIRRORFS-MARK written")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                paths = {e.get("path") for e in _events(state) if e["kind"] == "create"}
                if {"/hello.txt", "/dir/f"} <= paths and (mnt / "hello.txt").exists():
                    break
                time.sleep(0.1)
            assert {"/hello.txt", "/dir/f"} <= {e.get("path") for e in _events(state) if e["kind"] == "create"}, \
                attach.output()
            assert (mnt / "hello.txt").read_text() == "hello-libvirt\n"
            assert (mnt / "dir" / "f").read_text() == "inner\n"
            info = attach.info()
            assert info["domain"] == NAME and info["sync"] == "full" and info["copy"]["done"] == info["size"]
            ticks = lv.console().count("tick ")
            out = attach.detach()
    finally:
        force_unmount(mnt)
    assert "attached to domain mirrorfs-test disk vda" in out and "detached" in out
    assert "No current block job" in lv.virsh("blockjob", NAME, "vda", "--info")
    assert lv.virsh("domstate", NAME).split()[0] == "running"
    assert f"{lv.dir}/disk.raw" in lv.virsh("domblklist", NAME)  # no pivot: still on its own disk
    assert "<mirror" not in lv.virsh("dumpxml", NAME)
    log = Path(f"/var/log/libvirt/qemu/{NAME}.log")
    assert log.exists(), "libvirt keeps no domain log where the taint check looks"
    assert "taint" not in log.read_text(errors="replace").lower()
    deadline = time.monotonic() + 20
    while lv.console().count("tick ") <= ticks + 1:  # the guest goes on running after the detach
        assert time.monotonic() < deadline, lv.console()[-500:]
        time.sleep(0.2)
    # the copy came first: the log holds the whole disk, so the replica rebuilds without a base
    assert json.loads((state / "attach.json").read_text())["detached"]
    mirrorfs("replica", "--state", state, "-o", tmp_path / "replica.raw")


def test_a_killed_attach_leaves_a_job_the_next_one_replaces(libvirt_domain: Libvirt) -> None:
    """SIGKILL leaves libvirt's copy behind (its target gone); the next attach on the state dir aborts it, copies
    the disk again (which covers whatever the killed one lost) and detaches cleanly."""
    lv = libvirt_domain
    state = lv.dir / "state-kill"
    _attach(lv, state, "--disk", "vda").start(60).kill()
    assert "Block Copy" in lv.virsh("blockjob", NAME, "vda", "--info")
    again = _attach(lv, state, "--disk", "vda", "--no-engine")
    again.log_path = lv.dir / "again.log"
    with again:
        out = again.detach()
    assert "aborting the block copy a previous attach left on vda" in out and "logged the disk again" in out, out
    assert "No current block job" in lv.virsh("blockjob", NAME, "vda", "--info")
    assert lv.virsh("domstate", NAME).split()[0] == "running"


def test_disk_all_watches_every_writable_disk(libvirt_domain: Libvirt) -> None:
    """vda and vdc (vdb is read-only), each into DIR/TARGET, in one process; one SIGINT detaches both."""
    lv = libvirt_domain
    state = lv.dir / "state-all"
    attach = _attach(lv, state, "--disk", "all", "--no-engine")
    attach.state = state / "vdc"  # wait_ready reads this one's attach.json
    with attach:
        attach.state = state / "vda"
        attach.wait_ready(60)
        vda = json.loads((state / "vda" / "attach.json").read_text())
        assert vda["ready"] and vda["pid"] == attach.proc.pid and vda["copy"]["done"] == vda["size"]
        assert not (state / "vdb").exists()
        for disk in ("vda", "vdc"):
            assert "Block Copy" in lv.virsh("blockjob", NAME, disk, "--info")
        out = attach.detach()
    assert out.count("attached to domain") == 2
    for disk in ("vda", "vdc"):
        assert "No current block job" in lv.virsh("blockjob", NAME, disk, "--info")
        assert json.loads((state / disk / "attach.json").read_text())["detached"]
    assert lv.virsh("domstate", NAME).split()[0] == "running"


def test_errors_are_one_line(libvirt_domain: Libvirt, tmp_path: Path) -> None:
    lv = libvirt_domain
    cases = [
        (["--domain", "no-such-domain", "--connect", lv.uri], ["no domain 'no-such-domain'", NAME]),
        (["--domain", NAME, "--connect", lv.uri, "--disk", "vdz"], ["no disk 'vdz'", "vda", "--disk"]),
        (["--domain", NAME, "--connect", f"qemu:///system?socket={tmp_path}/none/libvirt-sock"],
         ["is libvirtd running", "--connect"]),
    ]
    for args, words in cases:
        proc = subprocess.run([*MIRRORFS, "attach", *args, "--state", str(tmp_path / "st")], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 1, proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr
    assert "No current block job" in lv.virsh("blockjob", NAME, "vda", "--info")

"""`attach --domain` against a real libvirtd running a TCG domain of the test guest.

The test runs its own libvirtd (a private unix socket directory, reached as qemu:///system?socket=...) and, if
none runs, a virtlogd; libvirt runs QEMU as libvirt-qemu, so the attach must give nbd.sock to that group and make
its directory reachable. libvirt re-probes QEMU for over a minute on every domain start when /dev/kvm exists but
is unusable (this machine), so the test's libvirtd sees an inaccessible /dev/kvm (a private mount namespace): the
domain is TCG either way. Everything started here is stopped by pid at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mountharness import force_unmount, wait_mounted
from tests.support import require, require_root, require_tools
from tests.tapharness import MIRRORFS, Attach, mirrorfs

pytestmark = pytest.mark.integration

NAME = "mirrorfs-test"
WORKLOAD = r"""
echo hello-libvirt > "$MNT/hello.txt"
mkdir "$MNT/dir" && echo inner > "$MNT/dir/f"
sync
echo MIRRORFS-MARK written
i=0
while true; do i=$((i + 1)); echo "tick $i"; sleep 1; done
"""

CONF = """unix_sock_dir = "{run}"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{d}/vmlinux</kernel><initrd>{d}/initramfs.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='writeback'/>
      <source file='{d}/disk.raw'/><target dev='vda' bus='virtio'/><serial>disk</serial></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{d}/workload.raw'/><target dev='vdb' bus='virtio'/><serial>workload</serial><readonly/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{d}/spare.raw'/><target dev='vdc' bus='virtio'/></disk>
    <serial type='file'><source path='{d}/console.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _pid(path: Path, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"no pid in {path}")


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


class Libvirt:
    """A private libvirtd (and virtlogd, unless one runs) with the test guest as a TCG domain, created paused."""

    def __init__(self) -> None:
        from images.build import artifact
        from images.guest import write_workload

        self.dir = Path(tempfile.mkdtemp(prefix="mirrorfs-libvirt-", dir="/tmp"))
        os.chmod(self.dir, 0o711)  # QEMU runs as libvirt-qemu: it must reach the disks libvirt chowns to it
        self.pids: list[int] = []
        try:
            self._start(artifact, write_workload)
        except BaseException:
            self.close()
            raise

    def _start(self, artifact, write_workload) -> None:
        self.uri = f"qemu:///system?socket={self.dir}/run/libvirt-sock"
        (self.dir / "run").mkdir()
        (self.dir / "libvirtd.conf").write_text(CONF.format(run=self.dir / "run"))
        nokvm = self.dir / "nokvm"
        os.mknod(nokvm, 0o000 | stat.S_IFCHR, os.makedev(1, 3))  # a device node no one but root may open
        if not Path("/run/libvirt/virtlogd-sock").is_socket():
            subprocess.run(["virtlogd", "-d", "-p", str(self.dir / "virtlogd.pid")], check=True)
            self.pids.append(_pid(self.dir / "virtlogd.pid"))
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount --bind {nokvm} /dev/kvm 2>/dev/null; exec libvirtd -d -f {self.dir}/libvirtd.conf "
                        f"-p {self.dir}/libvirtd.pid"], check=True)
        self.pids.append(_pid(self.dir / "libvirtd.pid"))
        deadline = time.monotonic() + 20
        while not (self.dir / "run" / "libvirt-sock").is_socket():
            assert time.monotonic() < deadline, "libvirtd did not open its socket (another libvirtd running?)"
            time.sleep(0.05)
        shutil.copyfile(artifact("vmlinux"), self.dir / "vmlinux")
        shutil.copyfile(artifact("initramfs.gz"), self.dir / "initramfs.gz")
        shutil.copyfile(artifact("ext4.img"), self.dir / "disk.raw")
        with open(self.dir / "spare.raw", "wb") as f:
            f.truncate(8 << 20)
        write_workload(self.dir / "workload.raw", WORKLOAD)
        (self.dir / "domain.xml").write_text(DOMAIN.format(name=NAME, d=self.dir))
        self.virsh("create", str(self.dir / "domain.xml"), "--paused")

    def virsh(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=120)
        assert not check or proc.returncode == 0, f"virsh {' '.join(args)}: {proc.stderr}"
        return proc.stdout + proc.stderr

    def console(self) -> str:
        path = self.dir / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_console(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console():
            assert time.monotonic() < deadline, f"{text!r} not on the console:\n{self.console()[-2000:]}"
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self.virsh("destroy", NAME, check=False)
        finally:
            for pid in reversed(self.pids):
                _stop(pid)
            shutil.rmtree(self.dir, ignore_errors=True)


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
    assert "taint" not in (log.read_text(errors="replace") if log.exists() else "").lower()
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

"""A private libvirtd (and virtlogd, unless one runs) running the test guest as a TCG domain, for the libvirt tests
and the benchmark of libvirt's block copy.

libvirtd listens on a private socket directory (reached as qemu:///system?socket=...), so a test never touches a
system libvirtd's domains. libvirt re-probes QEMU for over a minute on every domain start when /dev/kvm exists but
is unusable (this machine), so this libvirtd sees a /dev/kvm that only root may open (a private mount namespace):
the domain is TCG either way. Everything started here is stopped by pid in close().
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

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

    def __init__(self, disk: Path | None = None, workload: str = WORKLOAD) -> None:
        """`disk`: the raw image vda starts as (copied; default: images' ext4.img)."""
        from images.build import artifact
        from images.guest import write_workload

        self.dir = Path(tempfile.mkdtemp(prefix="mirrorfs-libvirt-", dir="/tmp"))
        os.chmod(self.dir, 0o711)  # QEMU runs as libvirt-qemu: it must reach the disks libvirt chowns to it
        self.pids: list[int] = []
        try:
            self._start(artifact, write_workload, disk, workload)
        except BaseException:
            self.close()
            raise

    def _start(self, artifact, write_workload, disk: Path | None, workload: str) -> None:
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
        subprocess.run(["cp", "--sparse=always", str(disk or artifact("ext4.img")), str(self.dir / "disk.raw")],
                       check=True)
        with open(self.dir / "spare.raw", "wb") as f:
            f.truncate(8 << 20)
        write_workload(self.dir / "workload.raw", workload)
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



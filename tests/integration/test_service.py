"""Run as a service (issue 15): the systemd template unit names this installation by absolute path, is
hardened and passes `systemd-analyze verify`; attach tells a Type=notify service manager it is ready once the
mirror job is, and that it is stopping when it detaches (sd_notify on NOTIFY_SOCKET, as systemd gives it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import require_root, require_tools
from tests.tapharness import Attach, mirrorfs

pytestmark = pytest.mark.integration


def test_install_unit_writes_a_verified_hardened_unit(tmp_path):
    require_tools("systemd-analyze")
    mirrorfs("install-unit", "--dir", tmp_path)
    unit = (tmp_path / "mirrorfs@.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith(f"ExecStart={Path(sys.executable).absolute()} -m mirrorfs.cli attach "), exec_start
    for setting in ("Type=notify", "NotifyAccess=main", "ProtectSystem=strict", "PrivateTmp=yes",
                    "StateDirectoryMode=0700", "NoNewPrivileges=yes", "DeviceAllow=/dev/fuse rw",
                    "CapabilityBoundingSet=CAP_SYS_ADMIN", "KillSignal=SIGINT"):
        assert setting in unit, setting
    instance = tmp_path / "mirrorfs@vm1.service"  # verify wants an instance of the template
    shutil.copyfile(tmp_path / "mirrorfs@.service", instance)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr  # it warns on any setting it cannot parse


def test_attach_notifies_ready_once_the_job_is_and_stopping_at_detach(tmp_path, monkeypatch):
    require_root()
    require_tools("qemu-storage-daemon", "mke2fs")
    from images.hostwriter import HostWriter

    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(base)], check=True, capture_output=True)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    with listener, HostWriter(disk, tmp_path / "qsd") as hw:
        attach = Attach(hw.qmp, tmp_path / "state", "--device", hw.node, "--base", str(base), "--no-engine")
        attach.spawn()
        try:
            first = listener.recv(4096).decode()
            # READY only once attach.json says the job is ready (wait_ready checks it is, and it is ours)
            attach.wait_ready(10)
            assert first.startswith("READY=1\n") and "STATUS=mirroring" in first, first
            attach.detach()
            assert listener.recv(4096).decode() == "STOPPING=1"
        finally:
            if attach.proc.poll() is None:
                attach.proc.kill()
                attach.proc.wait(10)

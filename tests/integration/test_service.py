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


def _exec_start(unit: str, env: dict[str, str], state: Path) -> list[str]:
    """ExecStart= as systemd runs it: ${X} is one word, $X splits at whitespace (systemd.service(5))."""
    line = next(line for line in unit.splitlines() if line.startswith("ExecStart=")).removeprefix("ExecStart=")
    argv: list[str] = []
    for word in line.replace("/var/lib/mirrorfs/%i", str(state)).split():
        if word.startswith("${") and word.endswith("}"):
            argv.append(env[word[2:-1]])
        elif word.startswith("$"):
            argv += env[word[1:]].split()
        else:
            argv.append(word)
    return argv


@pytest.mark.parametrize("source", ["--qmp {dir}/no-qemu.qmp",
                                    "--domain vm1 --connect qemu:///system?socket={dir}/no-libvirtd.sock"])
def test_the_units_command_line_takes_either_source(tmp_path, source):
    """SOURCE= in the instance's env file is `--qmp SOCKET` or `--domain NAME`: the unit's ExecStart, expanded as
    systemd expands it, is a command attach accepts, which then fails only on the missing QEMU or libvirtd, with
    its one-line error (not a usage error)."""
    mirrorfs("install-unit", "--dir", tmp_path)
    unit = (tmp_path / "mirrorfs@.service").read_text()
    env = {"SOURCE": source.format(dir=tmp_path), "METRICS": "127.0.0.1:0", "ATTACH_OPTS": "--no-engine"}
    proc = subprocess.run(_exec_start(unit, env, tmp_path / "state"), capture_output=True, text=True, timeout=60)
    assert proc.returncode not in (0, 2), (proc.returncode, proc.stderr)  # 2: argparse refused the command line
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ("no-qemu.qmp" in lines[0] or "libvirtd" in lines[0]), proc.stderr

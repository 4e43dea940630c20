"""Every attach error names its cause and the fix, with real QEMU on the other end."""

from __future__ import annotations

import shutil

import pytest

from tests.support import require_tools
from tests.tapharness import Attach, mirrorfs

pytestmark = pytest.mark.integration


def test_no_qmp_socket_says_how_to_start_qemu(tmp_path):
    proc = mirrorfs("attach", "--qmp", tmp_path / "nope.sock", "--state", tmp_path / "st", check=False)
    assert proc.returncode == 1
    assert "no QMP socket at" in proc.stderr and "-qmp unix:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_state_dir_that_was_never_recorded(tmp_path):
    proc = mirrorfs("log", "--state", tmp_path, check=False)
    assert proc.returncode == 1 and "not a mirrorfs state directory" in proc.stderr


@pytest.fixture
def paused_guest(tmp_path):
    require_tools("qemu-system-x86_64")
    from images.build import artifact
    from images.guest import Guest

    disk = tmp_path / "disk.raw"
    shutil.copyfile(artifact("ext4.img"), disk)
    with Guest(disk, "true", tmp_path / "vm", paused=True) as guest:
        yield guest


def test_unknown_drive_lists_the_drives(tmp_path, paused_guest):
    proc = mirrorfs("attach", "--qmp", paused_guest.qmp, "--state", tmp_path / "st", "--device", "nope", check=False)
    assert proc.returncode == 1
    assert "drive 'nope' not found" in proc.stderr and "drive0" in proc.stderr and "--device" in proc.stderr


def test_busy_qmp_state_in_use_and_qemu_refusal(tmp_path, paused_guest):
    state = tmp_path / "st"
    first = Attach(paused_guest.qmp, state).start()
    try:
        # QMP serves one client at a time: a second attach is told who may hold it
        proc = mirrorfs("attach", "--qmp", paused_guest.qmp, "--state", tmp_path / "other", check=False)
        assert proc.returncode == 1 and "one client at a time" in proc.stderr and "libvirt" in proc.stderr
        # the state directory is locked by the running attach
        proc = mirrorfs("attach", "--qmp", paused_guest.qmp, "--state", state, check=False)
        assert proc.returncode == 1 and f"in use by pid {first.proc.pid}" in proc.stderr
        # killed without detaching: the job stays; another state dir gets QEMU's own refusal
        first.kill()
        proc = mirrorfs("attach", "--qmp", paused_guest.qmp, "--state", tmp_path / "other", check=False)
        assert proc.returncode == 1 and "QEMU refused the mirror job" in proc.stderr
        assert "already runs block job(s) mirrorfs-drive0-" in proc.stderr
        # the same state dir takes its job back and detaches cleanly
        again = Attach(paused_guest.qmp, state, log=tmp_path / "again.log").start()
        assert "resuming mirror job" in again.output()
        again.detach()
    finally:
        first.__exit__()

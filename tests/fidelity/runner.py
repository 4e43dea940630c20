"""Run one workload through a real kernel with the mirror attached, then the engine over the recorded log.

Two writers, same script: the TCG guest (busybox; Guest paused, `attach --cont` so no write is missed) and the host
kernel through qemu-storage-daemon (HostWriter). Both in exact mode (write-blocking: every write in order), from a
base image copied per run. data=journal is set with `tune2fs -o journal_data` on the base copy: it becomes the
default mount option, so the guest's plain `mount` gets it too (ext4 refuses data= on remount).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from inference.events import Mutation
from tests.tapharness import Attach, mirrorfs

VARIANTS = {  # name -> (artifact, fstype, tune2fs -o default mount options)
    "ext2": ("ext2.img", "ext2", None),
    "ext3": ("ext3.img", "ext3", None),
    "ext4": ("ext4.img", "ext4", None),
    "ext4-data-journal": ("ext4.img", "ext4", "journal_data"),
    "ext4-1k": ("ext4-1k.img", "ext4", None),
}
RUNNERS = ("guest", "host")


@dataclass
class Run:
    """What a run leaves: the base image (T), the disk the writer ended with (T'), the events, and timings."""

    base: Path
    disk: Path
    state: Path
    fstype: str
    events: list[Mutation] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def prepare_base(variant: str, workdir: Path) -> tuple[Path, str]:
    from images.build import artifact

    name, fstype, default_opts = VARIANTS[variant]
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "base.raw"
    shutil.copyfile(artifact(name), base)
    if default_opts:
        subprocess.run(["tune2fs", "-o", default_opts, str(base)], check=True, capture_output=True)
    return base, fstype


def run_guest(disk: Path, script: str, workdir: Path, state: Path, timeout: float = 240) -> None:
    from images.guest import DONE, Guest, GuestError

    with Guest(disk, script, workdir / "vm", paused=True) as guest:
        with Attach(guest.qmp, state, "--mode", "exact", "--sync", "none", "--cont") as attach:
            guest.wait_for(DONE, timeout=timeout)
            guest.wait_for("reboot: Power down", timeout=30)
            attach.detach()
        if DONE + " rc=0" not in guest.console():
            raise GuestError(f"workload failed in the guest; console tail:\n{guest.console()[-3000:]}")


def run_host(disk: Path, script: str, workdir: Path, state: Path, fstype: str, timeout: float = 240) -> None:
    from images.hostwriter import HostWriter

    with HostWriter(disk, workdir / "qsd") as hw:
        with Attach(hw.qmp, state, "--device", hw.node, "--mode", "exact", "--sync", "none") as attach:
            hw.mount(fstype)
            proc = hw.run(script, timeout=timeout)
            hw.unmount()
            attach.detach()
        if proc.returncode:
            raise RuntimeError(f"workload failed on the host kernel ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def record(variant: str, runner: str, script: str, workdir: Path) -> Run:
    """Copy the variant's base image, run `script` on a copy of it with the mirror attached (no replay yet)."""
    t0 = time.monotonic()
    base, fstype = prepare_base(variant, workdir)
    disk, state = workdir / "disk.raw", workdir / "state"
    shutil.copyfile(base, disk)
    if runner == "guest":
        run_guest(disk, script, workdir, state)
    elif runner == "host":
        run_host(disk, script, workdir, state, fstype)
    else:
        raise ValueError(f"unknown runner {runner!r}")
    return Run(base, disk, state, fstype, seconds={"record": time.monotonic() - t0})


def replay(run: Run) -> list[Mutation]:
    """`mirrorfs replay` over the recorded log; the events it wrote to DIR/events.jsonl."""
    t0 = time.monotonic()
    mirrorfs("replay", "--state", run.state, "--base", run.base, timeout=600)
    run.seconds["replay"] = time.monotonic() - t0
    lines = (run.state / "events.jsonl").read_text(encoding="utf-8").splitlines()
    run.events = [Mutation.from_json(line) for line in lines if line.strip()]
    return run.events


def replay_available() -> bool:
    return mirrorfs("replay", "--help", check=False, timeout=60).returncode == 0


def host_python() -> str:
    """The interpreter the host runner's xattr ops use (busybox and this host have no setfattr)."""
    return sys.executable

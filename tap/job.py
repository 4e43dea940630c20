"""What an attach needs from whoever runs the mirror job: QEMU over QMP (tap.qmp_job), or libvirt (tap.libvirt_job).

The rest of an attach (state directory, NBD server, write log, ready and detach, attach.json) is the same either
way (tap.attach); a job driver only starts the copy onto our NBD socket, says when it is ready or has ended, and
stops it without a pivot, so the guest always stays on its own disk.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COPY_MODES = {"exact": "write-blocking", "async": "background"}


class AttachError(Exception):
    """Attach cannot go on; the message names the cause and the fix."""


@dataclass
class Drive:
    device: str  # what the job driver names the disk by: a drive id or node name (QMP), a target (libvirt)
    size: int
    description: str
    node: str = ""  # the block node under the drive (block-export-add takes it; QEMU's '#block..' names too)


class MirrorJob:
    """One mirror job of one disk. `connect()` holds the connection for the attach's lifetime; the other calls
    run inside it. Errors are AttachError (one line, cause and fix), or one of `errors` while detaching."""

    errors: tuple[type[BaseException], ...] = ()
    whole_copy = False  # every start copies the whole disk (no base; an unclean stop is covered by the copy)
    job_id = ""
    node = ""
    resumed = False  # start() found the job a previous attach left running
    open_state_dir = False  # QEMU runs as another user (libvirt-qemu): the state dir gets o+x so it reaches nbd.sock

    def where(self) -> dict[str, Any]:
        """attach.json's fields naming what this attach is attached to."""
        raise NotImplementedError

    def label(self, drive: Drive) -> str:
        """The disk as the ready line names it."""
        return drive.device

    def connect(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def find_drive(self, wanted: str | None) -> Drive:
        raise NotImplementedError

    def name(self, drive: Drive, state: Path) -> None:
        """Name the job (and target node) after the drive and the state directory: a restarted tap finds its own
        job, and an attach with another state directory never takes it over."""
        raise NotImplementedError

    async def start(self, sock: Path, mode: str, sync: str, reconnect_delay: int) -> None:
        """Start (or take back) the copy onto `sock`."""
        raise NotImplementedError

    async def wait_ready(self) -> None:
        """Return once the job started by start() is ready (may run beside progress())."""
        raise NotImplementedError

    async def progress(self) -> tuple[int, int] | None:
        """(bytes copied, of) as the hypervisor last said, or None without a job."""
        raise NotImplementedError

    async def wait_for_end(self) -> str:
        """Block until the job or the connection ends on its own; return why."""
        raise NotImplementedError

    async def detach(self) -> None:
        """Cancel the job without a pivot (a ready mirror first copies what is still dirty) and drop our target."""
        raise NotImplementedError

    async def prelaunch(self) -> bool:
        """The guest has not run since its hypervisor started (QEMU -S, a domain created paused)."""
        raise NotImplementedError

    async def cont(self) -> None:
        """Let a paused guest run."""
        raise NotImplementedError

    def export(self, sock: Path, *, server: Path | None, tag: str) -> AbstractAsyncContextManager[Any]:
        """A reader of the drive's own content (QEMU's read-only NBD export), for the base check and resync."""
        raise AttachError("this attach cannot read the disk outside its mirror job")

"""The mirror job over QEMU's own QMP socket: blockdev-add of an NBD node on our socket, blockdev-mirror onto it,
block-job-cancel to detach (never block-job-complete).

A tap killed without detaching leaves the job alive: with reconnect-delay and on-target-error=stop, QEMU waits for
us, and a new attach on the same state directory picks the job up again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tap.job import COPY_MODES, AttachError, Drive, MirrorJob
from tap.qmp_client import QMPClient, QMPConnectError, QMPError, open_qmp
from tap.state import EXPORT_NAME
from tap.verify import qemu_export

log = logging.getLogger("mirrorfs.attach")

DETACH_TIMEOUT = 120.0


def _drive_names(entry: dict[str, Any]) -> list[str]:
    inserted = entry.get("inserted") or {}
    names = (entry.get("device"), entry.get("qdev"), inserted.get("node-name"))
    return [n for n in names if n and not n.startswith("#")]  # '#block123' are QEMU's internal names


async def find_drive(qmp: QMPClient, wanted: str | None) -> Drive:
    """Resolve --device against query-block (VMs) and query-named-block-nodes (qemu-storage-daemon)."""
    candidates: list[Drive] = []
    for entry in await qmp.execute("query-block"):
        inserted = entry.get("inserted")
        if not inserted:
            continue
        names = _drive_names(entry)
        size = (inserted.get("image") or {}).get("virtual-size")
        if not names or not isinstance(size, int):
            continue
        device = entry.get("device") or inserted.get("node-name")
        d = Drive(device, size, " / ".join(names), inserted.get("node-name") or device)
        if wanted in names or (wanted is None and not inserted.get("ro")):
            candidates.append(d)  # by default only writable drives: read-only ones never change
    if wanted is not None and not candidates:
        for node in await qmp.execute("query-named-block-nodes", {"flat": True}):
            if node.get("node-name") == wanted:
                size = (node.get("image") or {}).get("virtual-size")
                if isinstance(size, int):
                    candidates.append(Drive(wanted, size, wanted, wanted))
                break
    if len(candidates) == 1:
        return candidates[0]
    listing = await list_drives(qmp)
    if wanted is None and candidates:
        raise AttachError("QEMU has several drives; choose one with --device:\n" + listing)
    raise AttachError(
        (f"drive {wanted!r} not found" if wanted else "QEMU has no writable drive with a medium") +
        "; choose one of these with --device:\n" + listing)


async def list_drives(qmp: QMPClient) -> str:
    lines = []
    for entry in await qmp.execute("query-block"):
        inserted = entry.get("inserted") or {}
        size = (inserted.get("image") or {}).get("virtual-size", "?")
        lines.append(f"  {' / '.join(_drive_names(entry)) or '(anonymous)'}  {size} bytes"
                     + ("" if inserted else "  (no medium)") + ("  (read-only)" if inserted.get("ro") else ""))
    for node in await qmp.execute("query-named-block-nodes", {"flat": True}):
        if node.get("node-name") and not node["node-name"].startswith("#"):
            size = (node.get("image") or {}).get("virtual-size", "?")
            lines.append(f"  node {node['node-name']}  {node.get('drv', '?')}  {size} bytes")
    return "\n".join(lines) or "  (none)"


def job_names(device: str, state: Path) -> tuple[str, str]:
    """(job id, target node name): derived from the device and the state directory, so a restarted
    tap finds its own job, and an attach with another state directory never takes it over."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in device)
    tag = hashlib.sha1(os.fsencode(Path(state).absolute())).hexdigest()[:8]
    return f"mirrorfs-{safe}-{tag}", f"mirrorfs-tgt-{safe}-{tag}"


class QMPJob(MirrorJob):
    """blockdev-mirror through QEMU's QMP socket (one client at a time: QEMU, or qemu-storage-daemon)."""

    errors = (AttachError, QMPError, QMPConnectError)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.qmp: QMPClient | None = None
        self.device = ""
        self._ready = False  # start() took back a job that is ready already

    def where(self) -> dict[str, Any]:
        return {"qmp": str(self.path)}

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[QMPClient]:
        try:
            async with open_qmp(self.path) as qmp:
                self.qmp = qmp
                yield qmp
        except QMPConnectError as exc:
            raise AttachError(str(exc)) from exc

    def _q(self) -> QMPClient:
        assert self.qmp is not None, "connect() first"
        return self.qmp

    async def find_drive(self, wanted: str | None) -> Drive:
        drive = await find_drive(self._q(), wanted)
        self.device = drive.device
        self.drive_node = drive.node
        return drive

    def name(self, drive: Drive, state: Path) -> None:
        self.job_id, self.node = job_names(drive.device, state)

    async def _job(self) -> dict[str, Any] | None:
        for job in await self._q().execute("query-block-jobs"):
            if job.get("device") == self.job_id:
                return job
        return None

    async def start(self, sock: Path, mode: str, sync: str, reconnect_delay: int) -> None:
        qmp = self._q()
        job = await self._job()
        if job is not None:
            # A previous tap on this state dir was killed: QEMU is reconnecting to our socket.
            print(f"mirrorfs: resuming mirror job {self.job_id} left by a previous attach", flush=True)
            self.resumed = True
            if job.get("paused") or job.get("status") == "paused":
                await qmp.execute("block-job-resume", {"device": self.job_id})
            if job.get("ready"):
                self._ready = True
                return
        else:
            try:
                await qmp.execute("blockdev-add", {
                    "driver": "nbd", "node-name": self.node, "export": EXPORT_NAME,
                    "server": {"type": "unix", "path": str(sock)}, "reconnect-delay": reconnect_delay})
            except QMPError as exc:
                raise AttachError(f"QEMU cannot open our NBD target: {exc.desc}") from exc
            try:
                await qmp.execute("blockdev-mirror", {
                    "job-id": self.job_id, "device": self.device, "target": self.node,
                    "sync": sync, "copy-mode": COPY_MODES[mode], "on-target-error": "stop"})
            except QMPError as exc:
                await self._drop_node()
                jobs = [j.get("device") for j in await qmp.execute("query-block-jobs")]
                hint = (f"; QEMU already runs block job(s) {', '.join(map(str, jobs))} (another attach, or one "
                        "killed without detaching: attach again with its --state, or block-job-cancel it)"
                        if jobs else "")
                raise AttachError(f"QEMU refused the mirror job: {exc.desc}{hint}") from exc

    async def wait_ready(self) -> None:
        if self._ready:
            return
        qmp = self._q()
        ev = await qmp.wait_event(
            lambda e: e.data.get("device") == self.job_id and e.name in (
                "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"))
        if ev is None:
            raise AttachError(f"lost QEMU before the mirror job was ready: {qmp.close_reason}")
        if ev.name != "BLOCK_JOB_READY":
            await self._drop_node()
            raise AttachError(f"the mirror job ended before it was ready: {ev.data.get('error', ev.name)}")

    async def progress(self) -> tuple[int, int] | None:
        job = await self._job()
        return None if job is None else (int(job.get("offset") or 0), int(job.get("len") or 0))

    async def wait_for_end(self) -> str:
        qmp = self._q()
        while (ev := await qmp.next_event()) is not None:
            if ev.data.get("device") != self.job_id:
                continue
            if ev.name == "BLOCK_JOB_ERROR":
                log.warning("mirror job I/O error (%s); QEMU pauses it and retries on reconnect",
                            ev.data.get("operation"))
            elif ev.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                return "the mirror job ended: " + str(ev.data.get("error", ev.name))
        return f"lost QEMU: {qmp.close_reason}"

    async def detach(self) -> None:
        qmp = self._q()
        log.info("detaching: block-job-cancel %s", self.job_id)
        job = await self._job()
        if job is not None:
            if job.get("paused") or job.get("status") == "paused":
                await qmp.execute("block-job-resume", {"device": self.job_id})
            await qmp.execute("block-job-cancel", {"device": self.job_id})
            ev = await qmp.wait_event(
                lambda e: e.data.get("device") == self.job_id
                and e.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), timeout=DETACH_TIMEOUT)
            if ev is None:
                raise AttachError(f"the mirror job did not end within {DETACH_TIMEOUT:.0f} s of block-job-cancel")
            if ev.data.get("error"):
                raise AttachError(f"the mirror job ended with an error: {ev.data['error']}")
        await self._drop_node()

    async def _drop_node(self) -> None:
        try:
            await self._q().execute("blockdev-del", {"node-name": self.node})
        except (QMPError, QMPConnectError) as exc:
            log.debug("blockdev-del %s: %s", self.node, exc)

    async def prelaunch(self) -> bool:
        return (await self._q().execute("query-status")).get("status") == "prelaunch"

    async def cont(self) -> None:
        status = await self._q().execute("query-status")
        if not status.get("running"):
            await self._q().execute("cont")

    def export(self, sock: Path, *, server: Path | None, tag: str):
        return qemu_export(self._q(), self.drive_node, sock, server=server, tag=tag)

"""The mirror job of a libvirt domain: libvirt's own block copy (virDomainBlockCopy) onto our NBD socket.

libvirtd holds the domain's only QMP connection, so the job goes through libvirt: it then knows about it
(`virsh blockjob` shows it, nothing is tainted). The destination is a network disk, NBD over our unix socket,
reused as it is (REUSE_EXT), copied with TRANSIENT_JOB (a persistent domain need not be made transient), and with
SYNCHRONOUS_WRITES in exact mode (QEMU's copy-mode write-blocking). Detaching is virDomainBlockJobAbort without
the PIVOT flag: the guest stays on its own disk. libvirt (9.0) always starts the copy with the whole disk (sync
"full", or "top" with SHALLOW, which is the same for a disk without a backing chain), so such an attach is a
`--sync full` one; the copy's progress comes from virDomainGetBlockJobInfo.

libvirt-python calls block, so they run in worker threads; its events (block job, lifecycle, connection closed)
come from libvirt's default event loop in a daemon thread and are handed to trio through the run's token.
"""

from __future__ import annotations

import logging
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import trio

from tap.job import AttachError, Drive, MirrorJob
from tap.state import EXPORT_NAME, access, grant_qemu_group

log = logging.getLogger("mirrorfs.attach")

DEFAULT_URI = "qemu:///system"
MAX_EVENTS = 10_000
STALE_EVENT_WAIT = 10.0  # seconds for the end event of a job aborted before a new start
_loop_lock = threading.Lock()
_loop_started = False


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise AttachError(f"attach --domain needs libvirt-python ({exc}): `make setup` installs it "
                          "(it builds against libvirt-dev)") from None
    return libvirt


def _start_event_loop() -> None:
    """libvirt delivers events only to a registered event loop, run by someone: one daemon thread per process,
    registered before the first connection is opened."""
    global _loop_started
    libvirt = _libvirt()
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, never printed as well
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def _message(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    return " ".join(str(get() if get else exc).split())  # one line, whatever libvirt put in it


def disks(xml: str) -> list[dict[str, Any]]:
    """The domain's disks from its XML: target, source, read-only, and the socket of a block copy onto NBD."""
    out = []
    for d in ET.fromstring(xml).iterfind("./devices/disk"):
        if d.get("device", "disk") not in ("disk", "lun"):
            continue  # cdrom, floppy: nothing to mirror
        target = d.find("target")
        if target is None or not target.get("dev"):
            continue
        src = d.find("source")
        source = "" if src is None else (src.get("file") or src.get("dev") or src.get("name") or src.get("volume")
                                         or "")
        host = d.find("./mirror/source/host")
        out.append({"target": target.get("dev"), "source": source, "readonly": d.find("readonly") is not None,
                    "mirror_socket": host.get("socket") if host is not None else None})
    return out


def qemu_gid(xml: str) -> int | None:
    """The group libvirt runs this domain's QEMU as: the DAC seclabel's `+UID:+GID` (None if unknown, or root)."""
    for label in ET.fromstring(xml).iterfind("./seclabel[@model='dac']/label"):
        _, _, gid = (label.text or "").partition(":")
        if gid.lstrip("+").isdigit() and int(gid.lstrip("+")) != 0:
            return int(gid.lstrip("+"))
    return None


class LibvirtJob(MirrorJob):
    """virDomainBlockCopy of one disk of one running domain onto our NBD socket."""

    whole_copy = True
    open_state_dir = True

    def __init__(self, domain: str, uri: str | None = None) -> None:
        self.domain_name = domain
        self.uri = uri or DEFAULT_URI
        self.conn: Any = None
        self.dom: Any = None
        self.target = ""
        self._events: trio.MemoryReceiveChannel[tuple[str, Any, Any]] | None = None
        self.errors = (AttachError, _libvirt().libvirtError)

    def where(self) -> dict[str, Any]:
        return {"qmp": None, "domain": self.domain_name, "connect": self.uri}

    def label(self, drive: Drive) -> str:
        return f"domain {self.domain_name} disk {drive.device}"

    async def _call(self, fn, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[None]:
        libvirt = _libvirt()
        _start_event_loop()
        token = trio.lowlevel.current_trio_token()
        send, self._events = trio.open_memory_channel[tuple[str, Any, Any]](MAX_EVENTS)

        def deliver(*item: Any) -> None:  # in libvirt's event thread
            def put() -> None:
                try:
                    send.send_nowait(item)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    pass
            try:
                token.run_sync_soon(put)
            except trio.RunFinishedError:
                pass

        try:
            self.conn = await self._call(libvirt.open, self.uri)
        except libvirt.libvirtError as exc:
            raise AttachError(
                f"cannot connect to libvirt at {self.uri} ({_message(exc)}): is libvirtd running? Start it "
                "(`systemctl start libvirtd`), or name the right one with --connect URI") from None
        callbacks: list[int] = []
        try:
            try:
                self.dom = await self._call(self.conn.lookupByName, self.domain_name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise AttachError(f"libvirt at {self.uri}: {_message(exc)}") from None
                names = sorted(await self._call(lambda: [d.name() for d in self.conn.listAllDomains()]))
                raise AttachError(
                    f"libvirt at {self.uri} has no domain {self.domain_name!r} (it has: {', '.join(names) or 'none'}); "
                    "give a name from `virsh list --all`, or another libvirt with --connect URI") from None
            if not await self._call(self.dom.isActive):
                raise AttachError(f"domain {self.domain_name} is not running: start it (`virsh start "
                                  f"{self.domain_name}`), then attach")
            self.conn.registerCloseCallback(lambda _c, reason, _o: deliver("closed", reason, None), None)
            callbacks.append(self.conn.domainEventRegisterAny(
                self.dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                lambda _c, _d, disk, _t, status, _o: deliver("job", disk, status), None))
            callbacks.append(self.conn.domainEventRegisterAny(
                self.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                lambda _c, _d, event, detail, _o: deliver("life", event, detail), None))
            gid = qemu_gid(await self._call(self.dom.XMLDesc, 0))
            if gid is not None and access().qemu_gid is None:
                group = grant_qemu_group(gid)
                print(f"mirrorfs: domain {self.domain_name}'s QEMU runs as group {group} (its DAC seclabel): "
                      f"nbd.sock is 0660 root:{group} (--qemu-group overrides)", flush=True)
            yield
        finally:
            with trio.CancelScope(shield=True):
                for cb in callbacks:
                    try:
                        self.conn.domainEventDeregisterAny(cb)
                    except libvirt.libvirtError:
                        pass
                try:
                    self.conn.unregisterCloseCallback()
                except libvirt.libvirtError:
                    pass
                await self._call(self.conn.close)

    async def find_drive(self, wanted: str | None) -> Drive:
        found = disks(await self._call(self.dom.XMLDesc, 0))
        listing = ", ".join(f"{d['target']} ({d['source'] or '?'}{', read-only' if d['readonly'] else ''})"
                            for d in found) or "none"
        if wanted is None:
            writable = [d for d in found if not d["readonly"]]
            if len(writable) != 1:
                raise AttachError(f"domain {self.domain_name} has {len(writable) or 'no'} writable disks ({listing}): "
                                  "choose one with --disk TARGET" + (", or --disk all" if writable else ""))
            wanted = writable[0]["target"]
        disk = next((d for d in found if d["target"] == wanted), None)
        if disk is None:
            raise AttachError(f"domain {self.domain_name} has no disk {wanted!r}; its disks: {listing}: "
                              "choose one with --disk TARGET (the target dev of `virsh domblklist`)")
        size = (await self._call(self.dom.blockInfo, wanted, 0))[0]
        self.target = wanted
        return Drive(wanted, int(size), f"{self.domain_name} {wanted} ({disk['source'] or '?'})", wanted)

    def name(self, drive: Drive, state: Path) -> None:
        self.job_id = f"libvirt block copy of {self.domain_name} {drive.device}"

    async def _job_info(self) -> dict[str, Any]:
        return await self._call(self.dom.blockJobInfo, self.target, 0) or {}

    async def start(self, sock: Path, mode: str, sync: str, reconnect_delay: int) -> None:
        libvirt = _libvirt()
        if await self._job_info():
            mine = next((d["mirror_socket"] == str(sock) for d in disks(await self._call(self.dom.XMLDesc, 0))
                         if d["target"] == self.target), False)
            if not mine:
                raise AttachError(
                    f"disk {self.target} of domain {self.domain_name} already has a block job (`virsh blockjob "
                    f"{self.domain_name} {self.target} --info`): another attach (attach again with its --state) or "
                    f"another tool; end it with `virsh blockjob {self.domain_name} {self.target} --abort`")
            # a previous attach on this state dir was killed: its copy has lost its target; start a new one
            print(f"mirrorfs: aborting the block copy a previous attach left on {self.target}; starting a new one",
                  flush=True)
            await self._abort()
            with trio.move_on_after(STALE_EVENT_WAIT):  # its end event must not pass for the new job's
                while (ev := await self._next())[0] != "job" or ev[1] != self.target \
                        or ev[2] == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
                    if ev[0] != "job":
                        raise AttachError(f"the block copy of {self.target} cannot start: {_why(ev[0], ev[1])}")
        dest = (f"<disk type='network'><driver type='raw'/><source protocol='nbd' name={quoteattr(EXPORT_NAME)}>"
                f"<host transport='unix' socket={quoteattr(str(sock))}/></source></disk>")
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        if mode == "exact":
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
        try:
            await self._call(self.dom.blockCopy, self.target, dest, {}, flags)
        except libvirt.libvirtError as exc:
            msg = _message(exc)
            hint = ""
            if "ermission denied" in msg:
                hint = (f"; QEMU runs as another user: let its group reach {sock} (--qemu-group GROUP, and "
                        f"`chmod o+x` on {sock.parent} and every directory above it; see mirrorfs-attach(1) LIBVIRT)")
            raise AttachError(f"libvirt refused the block copy of {self.target}: {msg}{hint}") from None

    async def wait_ready(self) -> None:
        libvirt = _libvirt()
        while True:
            kind, a, b = await self._next()
            if kind == "job" and a == self.target:
                if b == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
                    return
                await self._abort()
                raise AttachError(f"the block copy of {self.target} ended before it was ready ({_status(b)}); "
                                  "libvirtd's log says why")
            if kind != "job":
                raise AttachError(f"the block copy of {self.target} did not get ready: {_why(kind, a)}")

    async def _next(self) -> tuple[str, Any, Any]:
        assert self._events is not None
        while True:
            try:
                item = await self._events.receive()
            except trio.EndOfChannel:
                return ("closed", -1, None)
            if item[0] != "life" or item[1] == _libvirt().VIR_DOMAIN_EVENT_STOPPED:
                return item

    async def progress(self) -> tuple[int, int] | None:
        info = await self._job_info()
        return (int(info["cur"]), int(info["end"])) if info else None

    async def wait_for_end(self) -> str:
        while True:
            kind, a, b = await self._next()
            if kind == "job" and a == self.target and b != _libvirt().VIR_DOMAIN_BLOCK_JOB_READY:
                return f"the block copy of {self.target} ended: {_status(b)}"
            if kind != "job":
                return _why(kind, a)

    async def _abort(self) -> None:
        # no PIVOT flag: the guest stays on its own disk; no ASYNC flag: returns once the job is gone
        await self._call(self.dom.blockJobAbort, self.target, 0)

    async def detach(self) -> None:
        log.info("detaching: virDomainBlockJobAbort %s %s", self.domain_name, self.target)
        libvirt = _libvirt()
        try:
            if await self._job_info():
                await self._abort()
        except libvirt.libvirtError as exc:
            raise AttachError(f"cannot end the block copy of {self.target}: {_message(exc)}") from None

    async def prelaunch(self) -> bool:
        return False  # libvirt's copy is always of the whole disk: nothing depends on the guest not having run

    async def cont(self) -> None:
        libvirt = _libvirt()
        state, _ = await self._call(self.dom.state, 0)
        if state == libvirt.VIR_DOMAIN_PAUSED:
            await self._call(self.dom.resume)


def _status(status: Any) -> str:
    libvirt = _libvirt()
    return {libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed", libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
            libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "cancelled"}.get(status, f"status {status}")


def _why(kind: str, what: Any) -> str:
    if kind == "life":
        return "the domain stopped"
    return f"lost libvirtd (connection closed, reason {what})"


async def writable_disks(domain: str, uri: str | None = None) -> list[str]:
    """The targets of a running domain's writable disks (--disk all), with the same errors as an attach."""
    job = LibvirtJob(domain, uri)
    async with job.connect():
        found = [d["target"] for d in disks(await job._call(job.dom.XMLDesc, 0)) if not d["readonly"]]
    if not found:
        raise AttachError(f"domain {domain} has no writable disk to watch")
    return check_targets(domain, found)


def check_targets(domain: str, targets: list[str]) -> list[str]:
    """--disk all: each target becomes a directory name under --state and --mount, so only plain names."""
    odd = [t for t in targets if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", t)]
    if odd:
        raise AttachError(f"domain {domain}: disk target {odd[0]!r} cannot name a directory; attach that disk on "
                          "its own with --disk TARGET and a --state of its own")
    return targets

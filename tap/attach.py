"""Attach to a running VM: serve the NBD target, start the mirror job, record until told to stop.

The job itself is a driver's (tap.job): QEMU's QMP socket (tap.qmp_job) or a libvirt domain (tap.libvirt_job).
Detach always cancels it without a pivot, so the guest stays on its own disk.

Durability (man/mirrorfs-attach.1 "DURABILITY"): a write is in the log file before QEMU gets its ack, so a
killed tap loses nothing it acknowledged; what the kernel had not written back when the host crashed is lost
unless --fsync always (QEMU forwards no guest flushes). attach.json gets `detached` only after a clean stop, once
the log is fsynced; an attach that finds it missing resynchronizes (`_resync`): the replica rebuilt from the
base and the log, compared with the disk over QEMU's NBD export, what differs logged as new records.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import ssl
import stat
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tap import nbd
from tap.job import COPY_MODES, AttachError, Drive, MirrorJob
from tap.qmp_job import QMPJob
from tap.replica import BlockReplica
from tap.retention import Policy, Segments, open_replica, plan_log, reader_position
from tap.retention import current as current_checkpoint
from tap.retention import start as replica_start
from tap.server import TLSConfigError, check_listen, open_listeners, serve_nbd, server_tls_context
from tap.state import EXPORT_NAME, StateDir, access, remove_socket, socket_path, warn_unreachable
from tap.verify import Region, TrackingBackend, Verifier, VerifyError, WriteTracker, repaired_base
from tap.writelog import WriteLog

log = logging.getLogger("mirrorfs.attach")

VERIFY_MODES = ("metadata", "full", "none")
RegionsFn = Callable[[Callable[[int, int], bytes], int], Sequence[Region]]
COPY_POLL = 0.5  # seconds between asking QEMU how far a --sync full copy is


@dataclass
class AttachConfig:
    qmp: Path | None
    state: Path
    device: str | None = None
    mode: str = "exact"
    sync: str = "none"
    cont: bool = False
    fsync: str = "flush"
    reconnect_delay: int = 10
    base: Path | None = None
    listen: tuple[str, ...] = ()
    tls_creds: Path | None = None  # x509 directory for the --listen listeners (QEMU's own socket stays plain)
    verify: str = "metadata"  # is --base the disk? metadata | full | none (issue 16)
    repair_base: bool = False  # copy what differs into the state's replica and DIR/base.img instead of refusing
    verify_nbd: Path | None = None  # the unix socket of an NBD server QEMU already runs
    segment_bytes: int = 64 << 20  # write-log segment size: the unit retention folds
    retain: Policy | None = None  # fold old history into a checkpoint (tap.retention); None: keep it all


async def _once(event: trio.Event) -> AsyncIterator[None]:
    """A signal receiver's stand-in for attaches that share one: yields once `event` is set."""
    await event.wait()
    yield


def _let_search(path: Path) -> None:
    """o+x (search, no listing) on the state directory, so a QEMU of another user reaches nbd.sock in it; everything
    inside keeps its own mode (files 0600 or 0640, nbd.sock 0660 for QEMU's group only)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & stat.S_IXOTH:
            return
        os.fchmod(fd, mode | stat.S_IXOTH)
    finally:
        os.close(fd)
    print(f"mirrorfs: {path} is now searchable by other users (o+x, no listing) so that QEMU reaches nbd.sock; "
          "its files keep their own modes", flush=True)


class Attachment:
    """One attach run: the state dir, the log, the replica, the NBD server and the mirror job."""

    def __init__(self, cfg: AttachConfig, *, job: MirrorJob | None = None, regions: RegionsFn | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 copy_progress: Callable[[int, int], None] | None = None,
                 fold_cmd: Callable[[int, bool], list[str]] | None = None, reader: bool = False) -> None:
        """`job` runs the mirror job (default: QEMU's QMP socket `cfg.qmp`); `regions(read, size)` lists what
        `--verify metadata` compares (the caller's layer knows file systems); `progress(done, total)` draws
        `--verify full`'s bar, `copy_progress(done, total)` the --sync full copy's. `fold_cmd(seq, force)`: the
        command that folds the log up to seq into a checkpoint (`cfg.retain`; the caller's layer indexes it;
        `force`: free space is short, remove what readers use too); `reader`: a live engine reads the log, and
        retention waits for it (tap.retention)."""
        self.cfg = cfg
        if job is None:
            assert cfg.qmp is not None, "a QMP socket or a job driver"
            job = QMPJob(cfg.qmp)
        self.job = job
        self.fold_cmd, self.reader = fold_cmd, reader
        self.checkpoint: dict[str, Any] | None = None
        self.regions_fn, self.progress, self.copy_progress = regions, progress, copy_progress
        self.copied: tuple[int, int] | None = None  # --sync full: (bytes copied, of) as QEMU last said
        self.base: Path | None = cfg.base  # the base the engine must start from: DIR/base.img once repaired
        self.verified: dict[str, Any] | None = None
        self.state = StateDir(cfg.state)
        self.drive: Drive | None = None
        self.ready = False
        self.started = time.time()
        self.backend: TrackingBackend | None = None
        self.unclean: dict[str, Any] | None = None  # the previous attach's record when it did not stop cleanly
        self.resynced = False
        self.after_detach = False  # a clean detach before: the disk may have changed since (resync unless resumed)
        self.resumed = False  # the previous attach's mirror job was still there
        self.unclean_seen = False  # ... even if the resync could not start: then the next attach tries again
        self.tls: ssl.SSLContext | None = None

    def info(self, **extra: Any) -> dict[str, Any]:
        b = self.backend
        return {
            "pid": os.getpid(), **self.job.where(), "device": self.drive.device if self.drive else None,
            "size": self.drive.size if self.drive else None, "job": self.job.job_id, "node": self.job.node,
            "mode": self.cfg.mode, "sync": self.cfg.sync, "ready": self.ready,
            "last_seq": b.writelog.last_seq if b and b.writelog else 0,
            "writes": b.stats.writes if b else 0, "bytes": b.stats.bytes if b else 0,
            "nbd_socket": str(self.state.nbd_socket), "started": self.started, "updated": time.time(),
            "base": str(self.base) if self.base else None, "verify": self.verified,
            "copy": {"done": self.copied[0], "total": self.copied[1]} if self.copied else None,
            "write_latency": b.stats.latency() if b else None,
            "checkpoint": self.checkpoint,
            "replica_lagging": (b.lagging or None) if b else None,
            **extra,
        }

    async def run(self, *, announce=print, on_ready=None, stop: trio.Event | None = None) -> None:
        """Attach, record until a signal (or `stop`, for attaches that share one) or the job's end, detach.
        `on_ready()` runs once the job is ready."""
        cfg = self.cfg
        if self.job.whole_copy and (cfg.sync != "full" or cfg.base is not None):
            raise AttachError("this mirror job always copies the whole disk first: attach with --sync full, "
                              "without --base or --index")
        if cfg.mode not in COPY_MODES:
            raise AttachError(f"unknown --mode {cfg.mode!r}: use exact or async")
        if cfg.sync not in ("none", "full"):
            raise AttachError(f"unknown --sync {cfg.sync!r}: use none or full")
        if cfg.verify not in VERIFY_MODES:
            raise AttachError(f"unknown --verify {cfg.verify!r}: use metadata, full or none")
        if cfg.verify == "metadata" and self.regions_fn is None and self._checks_base():
            raise AttachError("--verify metadata needs the list of trusted regions: use --verify full or none")
        try:
            # A live guest disk over tcp only with TLS and client certificates, whatever the export's mode.
            check_listen(cfg.listen, tls=cfg.tls_creds is not None, read_only=False,
                         fix="give --tls-creds DIR (x509 files as QEMU takes them), or listen on unix:PATH")
            self.tls = server_tls_context(cfg.tls_creds) if cfg.tls_creds is not None else None
        except TLSConfigError as exc:
            raise AttachError(str(exc)) from None
        self.state.lock()
        try:
            async with self.job.connect():
                await self._run(announce, on_ready, stop)
        finally:
            self.state.unlock()

    async def _run(self, announce, on_ready, stop: trio.Event | None) -> None:
        cfg = self.cfg
        self.drive = drive = await self.job.find_drive(cfg.device)
        self.job.name(drive, self.state.path)
        fresh = self.state.read_state() is None  # a refused base leaves no state behind in a new directory
        previous = self.state.read_attach()
        self.state.init_state(drive.size, drive.device)
        writelog = WriteLog(self.state.log, fsync=cfg.fsync, segment_bytes=cfg.segment_bytes)
        ck = current_checkpoint(self.state.path)
        if ck is not None:
            self.checkpoint = {"seq": ck.seq, "time_ns": ck.time_ns}
        fresh = fresh and writelog.last_seq == 0
        refused = False
        try:
            self.unclean = self._unclean(previous, writelog)
            # detached cleanly before: the guest may have written since, with nobody recording
            self.after_detach = bool(self.unclean is None and previous is not None and previous.get("detached")
                                     and writelog.last_seq > 0 and cfg.sync == "none"
                                     and (cfg.base or previous.get("base") or previous.get("sync") == "full"))
            if self.unclean is not None:
                replica = self._rebuild(drive.size, self.unclean)
            else:
                replica = open_replica(self.state.path, self.state.replica, drive.size, cfg.base)
            self.backend = backend = TrackingBackend(
                replica=replica, writelog=writelog,
                tracker=WriteTracker() if self._checks_base() or self.unclean or self.after_detach else None)
            sock = self.state.nbd_socket
            exports = {EXPORT_NAME: nbd.Export(name=EXPORT_NAME, size=drive.size)}
            # the writable export: root's (0600), or --qemu-group's too (0660), never --group's
            listeners = await open_listeners([f"unix:{sock}"])
            if self.job.open_state_dir and access().qemu_gid is not None and sock.parent == self.state.path:
                _let_search(sock.parent)
            if access().qemu_gid is not None:  # the group QEMU runs as must reach the socket
                warn_unreachable(sock, access().qemu_gid, access().qemu_group)
            # --listen is for readers (nbdinfo, nbdcopy): a read-only export, so only QEMU's mirror job
            # writes the log, and a connection limit of its own, so readers cannot crowd QEMU out.
            readers = await open_listeners(list(cfg.listen), read_only=True) if cfg.listen else []
            reader_exports = {EXPORT_NAME: nbd.Export(name=EXPORT_NAME, size=drive.size, read_only=True)}
            self.state.write_attach(self.info())
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_nbd, listeners, exports, backend)
                nursery.start_soon(self._fsync_every_second)  # from the first write on, the base check included
                if readers:
                    await nursery.start(partial(serve_nbd, readers, reader_exports, backend, tls=self.tls))
                try:
                    await self._start_job(sock)
                    try:
                        if self.unclean is not None and self.job.whole_copy:
                            # the copy that just ended re-sent every byte of the disk: what the log lost is in it
                            backend.tracker = None
                            self.resynced = True
                            print("mirrorfs: the previous attach did not stop cleanly; the whole-disk copy just "
                                  "logged the disk again, so nothing it lost is missing", flush=True)
                        elif self.unclean is not None:
                            await self._resync(backend)
                        elif self.after_detach and not self.resumed and cfg.verify == "none":
                            print("mirrorfs: --verify none: the disk is not compared with the replica, although the "
                                  "guest may have written since the last detach, unrecorded; if it did, the replica "
                                  "and every event are wrong from here on", flush=True)
                        elif self.after_detach and not self.resumed:
                            assert previous is not None
                            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(previous["detached"]))
                            print(f"mirrorfs: {self.state.path} was detached at {when}; the guest may have written "
                                  "since, unrecorded: comparing the replica with the disk and logging what differs",
                                  flush=True)
                            await self._resync(backend)
                        else:
                            await self._verify_base(backend)
                    except BaseException as exc:  # Ctrl-C or a broken connection too: no job is left behind
                        refused = isinstance(exc, AttachError)
                        with trio.CancelScope(shield=True):
                            try:
                                await self.job.detach()
                            except self.job.errors as why:
                                log.warning("detaching after the base check: %s", why)
                        raise
                    if cfg.cont:
                        await self.job.cont()
                    # caught from before attach.json says ready: a script's SIGINT right then still detaches
                    with (trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) if stop is None
                          else nullcontext(_once(stop))) as signals:
                        self.ready = True
                        self.state.write_attach(self.info())
                        announce(f"mirrorfs: attached to {self.job.label(drive)} ({drive.size} bytes), mode "
                                 f"{cfg.mode}, sync {cfg.sync}; recording into {self.state.path} (Ctrl-C detaches)",
                                 flush=True)
                        if on_ready is not None:
                            on_ready()
                        nursery.start_soon(self._keep_info_current)
                        if cfg.retain is not None and self.fold_cmd is not None:
                            nursery.start_soon(self._retain, writelog.last_seq if cfg.sync == "full" else 0)
                        reason = await self._wait_for_end(signals)
                    if reason:
                        raise AttachError(reason)
                    await self.job.detach()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # `detached` in attach.json is the clean-stop mark: written only once the log is durable (whatever
            # --fsync says) and the replica checkpointed; a kill or a crash before this leaves it out
            writelog.sync()
            if self.backend:
                self.backend.replica.checkpoint()
                self.backend.replica.close()
            writelog.close()
            self.ready = False
            if refused and fresh:
                self._discard()
            if not self.unclean_seen or self.resynced:
                self.state.write_attach(self.info(detached=time.time()))
            else:  # the log still may lack acknowledged writes: the next attach resynchronizes
                self.state.write_attach(self.info(stopped=time.time(), resync_pending=True))
            remove_socket(self.state.nbd_socket)

    def _unclean(self, previous: dict[str, Any] | None, writelog: WriteLog) -> dict[str, Any] | None:
        """The previous attach's record if it did not stop cleanly (no `detached`) and its replica was meant to be
        the disk (a base, or --sync full); None otherwise. Without a base the replica never was the disk: then
        only a warning."""
        if previous is not None and previous.get("resync_pending"):
            pass  # an attach that found an unclean stop ended before its resync finished
        elif previous is None or previous.get("detached") or "pid" not in previous:
            if previous is None and writelog.last_seq:
                previous = {}  # records but no attach.json: treat as unclean
            else:
                return None
        base = self.cfg.base or (Path(previous["base"]) if previous.get("base") else None)
        self.unclean_seen = True
        full = "full" in (previous.get("sync"), self.cfg.sync)
        if base is None and not full:
            print(f"mirrorfs: the previous attach on {self.state.path} (pid {previous.get('pid', '?')}) did not "
                  "stop cleanly; its log may lack writes it acknowledged, and with no base (and --sync none) the "
                  "replica is not the disk, so nothing can be compared: give --base or attach with --sync full",
                  flush=True)
            self.unclean_seen = False
            return None
        if base is not None and not base.exists() and current_checkpoint(self.state.path) is None:
            raise AttachError(f"the previous attach on {self.state.path} did not stop cleanly, and its base {base} "
                              "is gone: give the base again with --base, or use a new --state with --sync full")
        return {**previous, "base_path": str(base) if base else None}

    def _rebuild(self, size: int, previous: dict[str, Any]) -> BlockReplica:
        """The replica after an unclean stop: its file may hold writes a host crash cut from the log (or miss
        some), so it is made again from the base and the log: then it is exactly what the log says."""
        base, base_seq = replica_start(self.state.path, Path(previous["base_path"]) if previous.get("base_path")
                                       else None)
        t0 = time.monotonic()
        self.state.replica.unlink(missing_ok=True)
        self.state.replica.with_name("replica.img.seq").unlink(missing_ok=True)
        replica = BlockReplica(self.state.replica, size, base=base, base_seq=base_seq)
        try:
            seq = replica.catch_up(self.state.log)
        except BaseException:
            replica.close()
            raise
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(previous["updated"])) \
            if isinstance(previous.get("updated"), (int, float)) else "?"
        print(f"mirrorfs: the previous attach on {self.state.path} (pid {previous.get('pid', '?')}, last seen "
              f"{when}) did not stop cleanly (killed, or the host crashed): its write log may lack writes it "
              "acknowledged, which QEMU will not send again. Rebuilt the replica from "
              f"{base or 'the log alone'} and the log's {seq} records in {time.monotonic() - t0:.1f} s; it is "
              "compared with the disk once the mirror job runs, and what differs is logged", flush=True)
        return replica

    async def _resync(self, backend: TrackingBackend) -> None:
        """After an unclean stop (or a clean detach: the guest wrote on, unrecorded): compare the whole replica with
        the disk while the job already logs new writes;
        what differs for CONFIRM_S, uncovered by a new write, is the disk's content the log lost: append it as
        WRITE records (so the engine and `replay` see it) and to the replica. Refuses to go on if it cannot."""
        assert self.drive is not None and backend.tracker is not None and backend.writelog is not None
        self.state.write_attach(self.info(verifying="resync"))
        t0 = trio.current_time()
        first = backend.writelog.last_seq + 1
        try:
            async with self.job.export(socket_path(self.state.path, "verify.sock"), server=self.cfg.verify_nbd,
                                       tag=self.job.job_id) as reader:
                out = await Verifier(reader, backend.replica, backend.tracker, mode=self.cfg.mode, repair=True,
                                     lock=backend.lock, apply=backend.write, progress=self.progress
                                     ).run([(0, self.drive.size, "disk")])
        except VerifyError as exc:
            raise AttachError(f"the log may lack writes the disk has, and it cannot be checked against the disk: "
                              f"{exc}; nothing was attached (the next attach tries again)") from None
        finally:
            backend.tracker = None
        seconds = trio.current_time() - t0
        self.verified = {"mode": "resync", "regions": out.regions, "bytes": out.compared,
                         "seconds": round(seconds, 3), "writes_during": out.writes_during,
                         "carried_bytes": out.carried, "repaired_bytes": out.repaired,
                         "differing": len(out.mismatches)}
        self.resynced = True
        if out.mismatches:
            print(f"mirrorfs: resynchronized: {len(out.mismatches)} range(s), {out.repaired} bytes, differed from "
                  f"the disk (the first at byte {out.mismatches[0][0]}); logged as new records from seq {first} on, "
                  f"so the events cover them; {out.compared} bytes compared in {seconds:.1f} s", flush=True)
        else:
            print(f"mirrorfs: resynchronized: the log and the disk agree ({out.compared} bytes compared in "
                  f"{seconds:.1f} s); nothing was lost", flush=True)

    def _checks_base(self) -> bool:
        return self.cfg.sync == "none" and self.cfg.base is not None and self.cfg.verify != "none"

    def _discard(self) -> None:
        """Forget what a refused attach recorded into a new state directory, so a later `--sync full` (or a fresh
        base) starts clean: a log that began before the engine's full copy would mislead it."""
        shutil.rmtree(self.state.log, ignore_errors=True)
        for p in (self.state.replica, self.state.replica.with_name("replica.img.seq"), self.state.state_file,
                  self.state.path / "base.img", self.state.path / "base.img.seq"):
            p.unlink(missing_ok=True)

    async def _verify_base(self, backend: TrackingBackend) -> None:
        """Is the base the disk? Compared while the job already logs every write; a mismatch detaches and refuses
        (or, with --repair-base, is copied into the replica and DIR/base.img). See tap.verify."""
        cfg = self.cfg
        if cfg.sync != "none" or cfg.base is None:
            return
        if cfg.verify == "none":
            log.warning("--verify none: %s is trusted unchecked; if it is not what the disk holds now, the replica, "
                        "every event and every view are wrong from the start, silently", cfg.base)
            return
        if cfg.cont and await self.job.prelaunch():
            print("mirrorfs: the guest has not run since QEMU started (-S): the base is not compared; it must be the "
                  "disk as QEMU opened it", flush=True)
            backend.tracker = None
            return
        assert self.drive is not None and backend.tracker is not None
        self.state.write_attach(self.info(verifying=cfg.verify))
        t0 = trio.current_time()
        if cfg.verify == "full":
            regions: Sequence[Region] = [(0, self.drive.size, "disk")]
        else:
            assert self.regions_fn is not None
            regions = await trio.to_thread.run_sync(self.regions_fn, backend.replica.read, self.drive.size)
        repair_into = None
        try:
            if cfg.repair_base:
                repair_into = repaired_base(cfg.base, self.state.path / "base.img", self.drive.size)
            async with self.job.export(socket_path(self.state.path, "verify.sock"), server=cfg.verify_nbd,
                                       tag=self.job.job_id) as reader:
                out = await Verifier(reader, backend.replica, backend.tracker, mode=cfg.mode, repair=cfg.repair_base,
                                     lock=backend.lock,
                                     repair_into=repair_into, progress=self.progress).run(regions)
        except VerifyError as exc:
            raise AttachError(str(exc)) from None
        finally:
            backend.tracker = None
            if repair_into is not None:
                repair_into.checkpoint()
                repair_into.close()
                repair_into.seq_path.unlink(missing_ok=True)  # a plain image, as any --base
        out.seconds = trio.current_time() - t0  # listing the regions and setting up the export included
        self.verified = {"mode": cfg.verify, "regions": out.regions, "bytes": out.compared,
                         "seconds": round(out.seconds, 3), "writes_during": out.writes_during,
                         "carried_bytes": out.carried, "repaired_bytes": out.repaired,
                         "differing": len(out.mismatches)}
        if out.mismatches and cfg.verify == "full" and self.regions_fn is not None:
            out.mismatches[0] = await self._name(out.mismatches[0], backend)
        if out.mismatches and not cfg.repair_base:
            off, length, what = out.mismatches[0]
            raise AttachError(
                f"the base {cfg.base} is not the disk: the {what} differs at bytes {off}-{off + length - 1}; "
                "nothing was attached. Attach with --sync full (no base), make a fresh base while the guest is "
                "paused (QEMU -S, then --cont), or give --repair-base to copy what differs")
        if out.mismatches:
            self.base = self.state.path / "base.img"
            print(f"mirrorfs: the base differed from the disk in {len(out.mismatches)} place(s) ({out.repaired} "
                  f"bytes, first: {out.mismatches[0][2]}); repaired into the replica and {self.base}, which replays "
                  "of this state must use as --base", flush=True)
        else:
            (self.state.path / "base.img").unlink(missing_ok=True)
            print(f"mirrorfs: the base is the disk: {out.compared} bytes in {out.regions} regions compared in "
                  f"{out.seconds:.2f} s ({cfg.verify}); {out.writes_during} writes meanwhile are in the log",
                  flush=True)

    async def _name(self, diff: Region, backend: TrackingBackend) -> Region:
        """A difference found by --verify full, named by the narrowest trusted region holding it, or a data block."""
        off, length, _ = diff
        assert self.regions_fn is not None and self.drive is not None
        try:
            regions = await trio.to_thread.run_sync(self.regions_fn, backend.replica.read, self.drive.size)
        except Exception as exc:  # naming is a courtesy: the base is refused either way
            log.debug("naming the difference: %s", exc)
            regions = []
        holders = [r for r in regions if r[0] <= off < r[0] + r[1]]
        return (off, length, min(holders, key=lambda r: r[1])[2] if holders else "data (no metadata the engine reads)")

    async def _start_job(self, sock: Path) -> None:
        """Start the job (or take it back) and wait until it is ready; a whole-disk copy meanwhile has a bar."""
        cfg = self.cfg
        await self.job.start(sock, cfg.mode, cfg.sync, cfg.reconnect_delay)
        async with trio.open_nursery() as nursery:
            if cfg.sync == "full":
                nursery.start_soon(self._report_copy)
            await self.job.wait_ready()
            nursery.cancel_scope.cancel()
        self.resumed = self.job.resumed
        if cfg.sync == "full":
            await self._copy_once()  # the copy's end: the bar (and attach.json) reach 100%

    async def _report_copy(self) -> None:
        """--sync full: how far the whole-disk copy is, for the bar (`copy_progress`) and attach.json's `copy`.
        QEMU (and libvirt) report a job's offset and length only when asked (no event carries them), so this
        asks every COPY_POLL seconds until the job is ready."""
        while True:
            await self._copy_once()
            await trio.sleep(COPY_POLL)

    async def _copy_once(self) -> None:
        copied = await self.job.progress()
        if copied is not None:
            self.copied = copied
            if self.copy_progress is not None:
                self.copy_progress(*copied)
            self.state.write_attach(self.info())

    async def _wait_for_end(self, signals: AsyncIterator[Any]) -> str:
        """Block until a signal (→ '') or the job or its connection ends on its own (→ the reason)."""
        async with trio.open_nursery() as nursery:
            result = [""]

            async def on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            async def on_end() -> None:
                result[0] = await self.job.wait_for_end()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(on_end)
        return result[0]

    async def _fsync_every_second(self) -> None:
        """fsync the log (per --fsync) in a worker thread once a second: QEMU forwards almost no guest flushes,
        so this bounds what a host crash can lose to about the last second (man mirrorfs-attach, DURABILITY)."""
        assert self.backend is not None
        while True:
            await trio.sleep(1)
            await trio.to_thread.run_sync(self.backend.sync)

    async def _retain(self, floor: int) -> None:
        """Retention (tap.retention): fold the oldest segments into a checkpoint when the policy says so, in a
        child process (never on the ack path). Checked once a second: free space has no event to wake on, and a
        check is a statvfs and a stat of the newest segment. `floor`: no fold before it (a --sync full copy)."""
        assert self.fold_cmd is not None and self.cfg.retain is not None
        segs = Segments(self.state.log)
        failed_at = -1.0
        while True:
            await trio.sleep(1)
            reader = reader_position(self.state.path) if self.reader else None
            got = plan_log(self.state.log, segs, self.cfg.retain, now_ns=time.time_ns(), reader=reader, floor=floor)
            if got is None or trio.current_time() - failed_at < 60:
                continue
            until, why = got
            if reader is not None and until >= reader:
                where = f"reads at seq {reader}" if reader else "has not started reading"
                print(f"mirrorfs: free space on {self.state.path} is short: folding the log up to seq {until} although "
                      f"the engine {where}; it reports the seqs it misses as an error event", flush=True)
            t0 = trio.current_time()
            proc = await trio.run_process(self.fold_cmd(until, why == "free space"), check=False)
            if proc.returncode != 0:
                failed_at = trio.current_time()
                log.warning("folding the write log up to seq %d failed (exit %d); retrying in a minute", until,
                            proc.returncode)
                continue
            ck = current_checkpoint(self.state.path)
            if ck is not None:
                self.checkpoint = {"seq": ck.seq, "time_ns": ck.time_ns}
                print(f"mirrorfs: history before {ck.describe()} folded into a checkpoint ({why}) in "
                      f"{trio.current_time() - t0:.1f} s", flush=True)

    async def _keep_info_current(self) -> None:
        """Rewrite attach.json for scripts once a second."""
        while True:
            await trio.sleep(1)
            self.state.write_attach(self.info())


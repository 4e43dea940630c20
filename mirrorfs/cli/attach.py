"""`mirrorfs attach`: the mirror job (QMP or libvirt), the tap, and the engine in a child process, per disk."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mirrorfs.cli.errors import CLIError, refuse_tls_psk
from mirrorfs.cli.progress import Progress


def _trusted_regions(read, size: int) -> list[tuple[int, int, str]]:
    """What `attach --verify metadata` compares: the inference engine's list (tap knows no file systems)."""
    from inference.regions import metadata_regions
    return [(r.offset, r.length, r.what) for r in metadata_regions(read, size)]


def _attach_target(args: argparse.Namespace) -> None:
    """--qmp or --domain, and what goes with each: a libvirt block copy always copies the whole disk first."""
    if args.domain is None:
        if args.disk or args.connect:
            raise CLIError("--disk and --connect go with --domain; a QMP attach names its drive with --device")
        args.sync = args.sync or "none"
        return
    if args.device:
        raise CLIError("--device names a QMP drive; a libvirt domain's disk is --disk TARGET (`virsh domblklist "
                       f"{args.domain}`)")
    if args.sync == "none" or args.base or args.index:
        raise CLIError("libvirt's block copy always copies the whole disk first, so a --domain attach needs no base: "
                       "drop --sync none, --base and --index")
    args.sync = "full"


def cmd_attach(args: argparse.Namespace) -> None:
    import subprocess

    import trio

    from mirrorfs.cli.retain import fold_command, retention_policy
    from mirrorfs.cli.service import notify
    from tap.attach import AttachConfig, AttachError, Attachment
    from tap.retention import READING

    refuse_tls_psk(args)
    _attach_target(args)
    base = args.base
    if args.index is not None and base is None:
        from inference.engine import load_index
        base = Path(load_index(args.index)["base"])
    if args.repair_base and (args.sync != "none" or base is None or args.verify == "none"):
        raise CLIError("--repair-base repairs a base: give --base (or --index) with --sync none and --verify "
                       "metadata or full")
    wants_engine = bool(not args.no_engine and (args.base or args.index or args.sync == "full"))
    if args.mount is not None and not wants_engine:
        raise CLIError("--mount needs the inference engine: give --base or --index (or --sync full)")
    targets: list[str | None] = [args.device if args.domain is None else args.disk]
    every = args.domain is not None and args.disk == "all"
    if every and args.listen:
        raise CLIError("--listen serves one disk: with --disk all, attach each disk on its own (--disk TARGET)")
    if every:
        from tap.libvirt_job import writable_disks
        targets = list(trio.run(writable_disks, args.domain, args.connect))

    class Unit:
        """One disk's attach: its state directory, its engine, its view."""

        def __init__(self, target: str | None) -> None:
            self.state = args.state / target if every and target else args.state
            self.mount = args.mount / target if every and target and args.mount is not None else args.mount
            cfg = AttachConfig(qmp=args.qmp, state=self.state, device=target, mode=args.mode, sync=args.sync,
                               cont=args.cont, fsync=args.fsync, reconnect_delay=args.reconnect_delay,
                               base=base, listen=tuple(args.listen), tls_creds=args.tls_creds,
                               verify=args.verify, repair_base=args.repair_base, verify_nbd=args.verify_nbd,
                               segment_bytes=args.segment_size, retain=retention_policy(args))
            job = None
            if args.domain is not None:
                from tap.libvirt_job import LibvirtJob
                job = LibvirtJob(args.domain, args.connect)
            self.copy_bar = Progress(f"copy {target}" if every else "copy", unit=" B")
            self.shown = -1
            self.attachment = Attachment(cfg, job=job, regions=_trusted_regions,
                                         progress=Progress("verify", unit=" B"), copy_progress=self.copying,
                                         reader=wants_engine,
                                         fold_cmd=fold_command(self.state, lambda: self.attachment.base,
                                                               args.access_group))
            self.engine: subprocess.Popen | None = None
            self.ready = False

        def copying(self, done: int, total: int) -> None:
            """--sync full: the bar on a terminal, and the service manager's status line (each whole percent)."""
            self.copy_bar(done, total)
            pct = done * 100 // total if total else 100
            if pct != self.shown:
                self.shown = pct
                notify(f"STATUS=copying the whole disk{' ' + str(self.state.name) if every else ''}: {pct}% of "
                       f"{total} bytes")

        def start_engine(self) -> None:
            """The engine runs in its own process, following the log: it never slows the ack path."""
            attachment = self.attachment
            attachment.progress.close()
            self.copy_bar.close()
            if not wants_engine:
                return
            (self.state / READING).unlink(missing_ok=True)  # an earlier engine's: retention waits for this one's
            cmd = [sys.executable, "-m", "mirrorfs.cli", "replay", "--state", str(self.state), "--follow",
                   "--attach-pid", str(os.getpid())]
            if attachment.base is not None and attachment.base != base:  # repaired: the index is of the old base
                cmd += ["--base", str(attachment.base)]
            else:
                cmd += ["--index", str(args.index)] if args.index else ["--base", str(args.base)] if args.base else []
            cmd += ["--metrics", args.metrics] if args.metrics and not every else []
            cmd += [a for g in args.scope for a in ("--scope", g)]
            cmd += ["--scope-from-subscribers"] if args.scope_from_subscribers else []
            cmd += ["--hash-limit", str(args.hash_limit) if args.hash_limit is not None else "none"]
            cmd += ["--diff-limit", str(args.diff_limit) if args.diff_limit is not None else "none"]
            cmd += ["--diff-store", str(args.diff_store) if args.diff_store is not None else "none"]
            cmd += ["--group", args.access_group] if args.access_group else []
            if self.mount is not None:
                if every:
                    self.mount.mkdir(parents=True, exist_ok=True)
                cmd += ["--mount", str(self.mount)] + (["--allow-other"] if args.allow_other else [])
                cmd += ["--assemble"] if args.assemble else []
            self.engine = subprocess.Popen(cmd, start_new_session=True)
            print(f"mirrorfs: inference engine pid {self.engine.pid}: mutation events in {self.state}/events.jsonl",
                  flush=True)

        def on_ready(self) -> None:
            self.start_engine()
            self.ready = True
            if all(u.ready for u in units):
                what = args.device or args.disk or "the disk"
                where = f"{args.domain} {what}" if args.domain else what
                notify(f"READY=1\nSTATUS=mirroring {where} into {args.state}")  # Type=notify

    units = [Unit(t) for t in targets]
    if every and args.metrics:
        print("mirrorfs: --metrics with --disk all: not served (one address cannot serve several engines); "
              "run `mirrorfs attach --disk TARGET` per disk for metrics", file=sys.stderr, flush=True)

    async def run_all() -> None:
        """Several disks: one signal detaches them all; one that fails detaches the others too."""
        import signal as signals

        stop = trio.Event()
        failed: list[BaseException] = []

        async def one(u: Unit) -> None:
            try:
                await u.attachment.run(on_ready=u.on_ready, stop=stop)
            except AttachError as exc:
                failed.append(AttachError(f"{u.state.name}: {exc}"))
                stop.set()

        with trio.open_signal_receiver(signals.SIGINT, signals.SIGTERM) as received:
            async with trio.open_nursery() as nursery:
                async def on_signal() -> None:
                    async for _ in received:
                        stop.set()
                nursery.start_soon(on_signal)
                async with trio.open_nursery() as disks:
                    for u in units:
                        disks.start_soon(one, u)
                nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]

    try:
        if every:
            trio.run(run_all)
        else:
            trio.run(lambda: units[0].attachment.run(on_ready=units[0].on_ready))
    finally:
        notify("STOPPING=1")
        for u in units:  # it sees the detach in attach.json, drains the log, reports what is pending, exits
            proc = u.engine
            if proc is None:
                continue
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    print(f"mirrorfs: the inference engine (pid {proc.pid}) was still draining the write log "
                          f"150 s after the detach and was killed, so {u.state}/events.jsonl stops short of "
                          f"the log's end; `mirrorfs replay --state {u.state} --base IMAGE` makes every event "
                          "from the log", file=sys.stderr, flush=True)
    print("mirrorfs: detached", flush=True)

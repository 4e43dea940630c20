"""`mirrorfs`: the command line. Each subcommand is a thin shell over tap/, inference/ and mirrorfs/."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mirrorfs.cli.errors import CLIError, refuse_tls_psk
from mirrorfs.cli.progress import Progress

EPILOG = """\
examples:
  # QEMU started with: -qmp unix:/run/vm1.qmp,server=on,wait=off
  mirrorfs attach --qmp /run/vm1.qmp --state /var/lib/mirrorfs/vm1
  mirrorfs log --state /var/lib/mirrorfs/vm1 | tail
  mirrorfs replica --state /var/lib/mirrorfs/vm1 --base vm1-base.raw -o /tmp/vm1-now.raw

See mirrorfs(1) and mirrorfs-attach(1): man -l man/mirrorfs.1
"""


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, type=Path, metavar="DIR",
                   help="state directory of one watched disk (write log, replica, metadata)")


def _group_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", dest="access_group", metavar="GROUP",
                   help="grant one host group (name or gid) read access: the state directory 2750, its files 0640 "
                        "and read-only sockets (events.sock, --listen) 0660, root:GROUP, and the view to root and "
                        "GROUP's members only; never nbd.sock, which takes writes (see --qemu-group) (default: "
                        "root's alone: 0700/0600, the view root's; see SECURITY in mirrorfs(1))")


def _mount_args(p: argparse.ArgumentParser, name: str) -> None:
    if name.startswith("--"):
        p.add_argument(name, type=Path, metavar="MNT",
                       help="also serve the live read-only FUSE view of the disk's file systems at MNT "
                            "(needs the engine; see mirrorfs-mount(1))")
    else:
        p.add_argument(name, type=Path, metavar="MNT", help="mount point (an existing directory)")
    p.add_argument("--allow-other", action="store_true",
                   help="let EVERY host user into the view (guest file modes then decide what they read); "
                        "--group GROUP is the safe way to share it")
    p.add_argument("--assemble", action="store_true",
                   help="several file systems: lay them out as the guest's /etc/fstab says (the file system "
                        "holding it at the root) instead of one directory each")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mirrorfs")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirrorfs", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Agentless file monitoring of virtual machines: QEMU mirrors a running VM's disk "
                    "writes to mirrorfs, which records them and turns them into file-level mutations.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0,
                        help="less log output: errors only (warnings are dropped)")
    parser.add_argument("--version", action="version", version=f"mirrorfs {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "attach", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="mirror a running VM's disk writes into a state directory until interrupted",
        description="Attach to a running QEMU (or qemu-storage-daemon) through its QMP socket, or to a libvirt "
                    "domain through libvirt (--domain): serve an NBD target, start a mirror job onto it "
                    "(blockdev-mirror; libvirt's block copy), and append every write to the state directory's "
                    "write log. Ctrl-C or SIGTERM detaches cleanly (the job is cancelled without a pivot; the "
                    "guest stays on its own disk). Once the job is ready, one line says so and DIR/attach.json "
                    "holds pid, device, mode, sync, ready and last seq.",
        epilog="""examples:
  mirrorfs attach --qmp vm1.qmp --state st/vm1                      # exact copy, from now on
  mirrorfs attach --qmp vm1.qmp --state st/vm1 --mode async         # lowest guest overhead
  mirrorfs attach --qmp vm1.qmp --state st/vm1 --sync full          # also copy the whole disk first
  mirrorfs attach --qmp vm1.qmp --state st/vm1 --base vm1.raw       # base checked against the disk first
  qemu-system-x86_64 -S ... ; mirrorfs attach --qmp vm1.qmp --state st/vm1 --cont   # miss nothing
  mirrorfs attach --domain vm1 --state st/vm1 --mount /mnt/vm1      # a libvirt domain (copies the disk first)
  mirrorfs attach --domain vm1 --disk all --state st/vm1            # every disk: st/vm1/vda, st/vm1/vdb, ...
""")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--qmp", type=Path, metavar="SOCKET", help="QEMU's QMP unix socket")
    target.add_argument("--domain", metavar="NAME",
                        help="a running libvirt domain: libvirt's own block copy job (virsh blockjob shows it), "
                             "which always copies the whole disk first (so --sync full, no --base). QEMU runs as "
                             "libvirt-qemu: nbd.sock is made 0660 for its group and DIR searchable (o+x, no "
                             "listing); the directories above DIR must be searchable too (man mirrorfs-attach, "
                             "LIBVIRT: also AppArmor and SELinux)")
    _state_arg(p)
    p.add_argument("--device", metavar="DRIVE",
                   help="drive id, qdev id or node name to mirror (default: the only drive)")
    p.add_argument("--disk", metavar="TARGET|all",
                   help="with --domain: the disk's target (vda, sda: `virsh domblklist NAME`; default: the only "
                        "writable disk), or all: every writable disk, each into DIR/TARGET (and MNT/TARGET)")
    p.add_argument("--connect", metavar="URI",
                   help="with --domain: libvirt's URI (default qemu:///system)")
    p.add_argument("--mode", choices=["exact", "async"], default="exact",
                   help="exact: write-blocking copy, every write as issued (default); "
                        "async: background copy, coalesced, least guest overhead")
    p.add_argument("--sync", choices=["none", "full"], default=None,
                   help="none: only new writes (default; pair with the base image); "
                        "full: copy the whole disk first, so no base image is needed (always, with --domain)")
    p.add_argument("--cont", action="store_true",
                   help="resume a paused VM (QEMU -S) once the mirror job is ready, so no write is missed")
    p.add_argument("--fsync", choices=["always", "flush", "never"], default="flush",
                   help="when the write log is fsynced before the ack: always (every write: a host crash loses "
                        "no acknowledged write), flush (default: on NBD FLUSH/FUA and once a second; a host crash "
                        "loses up to ~1 s), never (a host crash loses what the kernel had not written back). A "
                        "write is in the log file before its ack under every policy, so a killed mirrorfs loses "
                        "nothing; after any unclean stop the next attach compares with the disk and logs what "
                        "the log lost (man mirrorfs-attach, DURABILITY)")
    p.add_argument("--reconnect-delay", type=int, default=10, metavar="SECONDS",
                   help="how long QEMU holds writes and retries if this process dies (default 10)")
    p.add_argument("--base", type=Path, metavar="IMAGE",
                   help="image of the disk when the attach starts: seeds the replica served to readers and "
                        "starts the inference engine live (events in DIR/events.jsonl)")
    p.add_argument("--index", type=Path, metavar="INDEX",
                   help="like --base, from a pre-index made by `mirrorfs index` (faster start)")
    p.add_argument("--verify", choices=["metadata", "full", "none"], default="metadata",
                   help="is the base the disk? Compared through QEMU's read-only NBD export while the guest runs "
                        "and its writes are logged: metadata (default) compares what the engine trusts (partition "
                        "tables, LVM metadata, superblocks, group descriptors, bitmaps, inode tables, directories, "
                        "the journal); full compares every block; none trusts the base unchecked. Skipped when "
                        "QEMU was started with -S and --cont is given (the guest never ran)")
    p.add_argument("--repair-base", action="store_true",
                   help="where the base differs from the disk, copy the disk's blocks into the replica and into "
                        "DIR/base.img (the base the engine then uses) instead of refusing")
    p.add_argument("--verify-nbd", type=Path, metavar="SOCKET",
                   help="unix socket of the NBD server QEMU already runs (nbd-server-start, or "
                        "qemu-storage-daemon --nbd-server): the check adds its read-only export there")
    p.add_argument("--no-engine", action="store_true",
                   help="record only: no inference engine even with --base/--index/--sync full")
    p.add_argument("--listen", action="append", default=[], metavar="ADDR",
                   help="extra NBD listener for readers (read-only), unix:PATH or tcp:HOST:PORT (repeatable); "
                        "tcp needs --tls-creds")
    _tls_args(p)
    p.add_argument("--metrics", metavar="ADDR",
                   help="the engine serves Prometheus metrics on HOST:PORT (or :PORT, on 127.0.0.1)")
    _mount_args(p, "--mount")
    _group_arg(p)
    p.add_argument("--qemu-group", metavar="GROUP",
                   help="let one host group (name or gid) connect to nbd.sock, the WRITABLE export QEMU's mirror "
                        "job writes to: 0660 root:GROUP, for a QEMU running as another user (libvirt: "
                        "libvirt-qemu); the socket's directory must be searchable by it. Default, and with --group "
                        "alone: 0600, root's")

    from mirrorfs.cli import retain as cli_retain
    cli_retain.add_attach_args(p)
    _scope_args(p)
    _hash_arg(p)
    p = sub.add_parser("log", help="list the write log's records",
                       description="List the records of a state directory's write log: seq, host receive "
                                   "time, kind, offset and length.")
    _state_arg(p)
    p.add_argument("--since", type=int, default=1, metavar="SEQ", help="first seq to list (default 1)")
    p.add_argument("--until", type=int, metavar="SEQ", help="last seq to list")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing records as they are appended (Ctrl-C stops)")

    p = sub.add_parser("replica", help="write the disk as the log makes it at a seq",
                       description="Write the block-level point-in-time view: the base image (or zeros) "
                                   "with every logged write up to --until applied.",
                       epilog="example: mirrorfs replica --state st/vm1 --base vm1.raw --until 5000 -o t.raw")
    _state_arg(p)
    p.add_argument("--base", type=Path, metavar="IMAGE",
                   help="raw image of the disk when recording started (omit after --sync full)")
    p.add_argument("--until", type=int, metavar="SEQ", help="last seq to apply (default: all)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="raw image to write")

    p = sub.add_parser(
        "replay", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the inference engine over a recorded write log: file-level mutation events",
        description="Run the inference engine over a state directory's write log and write its mutation events "
                    "to DIR/events.jsonl (one JSON object per line, see mirrorfs-events(5)). The engine needs the "
                    "disk as it was when recording started: --base IMAGE (raw or qcow2), or --index INDEX made by "
                    "`mirrorfs index`; after `attach --sync full` it needs neither.",
        epilog="examples:\n  mirrorfs replay --state st/vm1 --base vm1-base.raw\n"
               "  mirrorfs index vm1-base.raw -o vm1.idx && mirrorfs replay --state st/vm1 --index vm1.idx\n"
               "  mirrorfs events --state st/vm1 --kind rename")
    _state_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--base", type=Path, metavar="IMAGE", help="the disk image at the start of recording")
    src.add_argument("--index", type=Path, metavar="INDEX", help="a pre-index of that image (mirrorfs index)")
    p.add_argument("--vm", default="", help="VM name stamped on each event (default: the state dir's name)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep following the log as it grows, until the attach detaches or SIGINT/SIGTERM "
                        "(then drain, finish, exit)")
    p.add_argument("--metrics", metavar="ADDR",
                   help="with --follow: serve Prometheus metrics on HOST:PORT (or :PORT, on 127.0.0.1)")
    # the attach that started this engine: a newer attach of the state dir (after a kill) ends it too
    p.add_argument("--attach-pid", type=int, default=None, help=argparse.SUPPRESS)
    _scope_args(p)
    _hash_arg(p)
    _mount_args(p, "--mount")
    _group_arg(p)

    p = sub.add_parser(
        "mount", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="serve a state directory's file systems as a read-only FUSE view",
        description="Replay a state directory's write log (as `mirrorfs replay`) and serve the file systems "
                    "it leaves as a read-only FUSE mount until SIGINT/SIGTERM or `mirrorfs umount`. For the live "
                    "view of a running attach, use `mirrorfs attach ... --mount MNT`. See mirrorfs-mount(1).",
        epilog="examples:\n  mirrorfs mount --state st/vm1 --base vm1-base.raw /mnt/vm1 &\n"
               "  mirrorfs mount --state st/vm1 --at -1h /mnt/vm1-an-hour-ago &\n"
               "  find /mnt/vm1 -newer /mnt/vm1/etc/hostname\n  mirrorfs umount /mnt/vm1")
    _state_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--base", type=Path, metavar="IMAGE",
                     help="the disk image at the start of recording (default: what the last replay used)")
    src.add_argument("--index", type=Path, metavar="INDEX", help="a pre-index of that image (mirrorfs index)")
    p.add_argument("--vm", default="", help="VM name (default: the state dir's name)")
    p.add_argument("--at", metavar="WHEN",
                   help="the view as of WHEN instead of the log's end: a seq, an ISO-8601 time or -90s, -5min, -2h "
                        "(see mirrorfs-history(1)); events.jsonl is left as it is")
    _hash_arg(p)
    _mount_args(p, "mountpoint")
    _group_arg(p)

    p = sub.add_parser("umount", help="unmount a mirrorfs view",
                       description="Unmount a view served by `mirrorfs mount` or `attach --mount` (the serving "
                                   "process then exits); a stale mount left by a killed mirrorfs is lazily "
                                   "detached.")
    p.add_argument("mountpoint", type=Path, metavar="MNT")

    p = sub.add_parser("stat", help="what mirrorfs knows of a file of a view (guest inode, seq, flags)",
                       description="Print a view file's guest inode, the seq and time of the last mutation the "
                                   "view applied to it, its inode flags (chattr's, by name; lsattr cannot ask "
                                   "a FUSE view) and i_blocks. Read from the view by xattr name "
                                   "(user.mirrorfs.*), which no tool lists; see mirrorfs-mount(1).")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="a path inside a mirrorfs view")
    p.add_argument("--json", action="store_true", help="one JSON object a line")

    p = sub.add_parser("events", help="read the mutation event log",
                       description="Print the mutation events of a state directory (written by replay or a "
                                   "live attach), optionally following new ones.")
    _state_arg(p)
    p.add_argument("--since", type=int, default=0, metavar="SEQ", help="only events with seq >= SEQ")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    p.add_argument("--diff", action="store_true",
                   help="modify and truncate events of text files carry a unified diff of the content before and "
                        "after (`diff`; in text, indented under the event), from the versions the engine kept "
                        "(--diff-limit); where there is none, `diff_skipped` says why (binary, too large, ...)")
    from mirrorfs.cli import stream as cli_stream
    cli_stream.add_filter_args(p)
    cli_stream.add_output_args(p)
    cli_stream.add_format_args(p)
    cli_stream.add_parsers(sub)
    from mirrorfs.cli import history as cli_history
    cli_history.add_parsers(sub, _state_arg, raw_image)

    p = sub.add_parser("index", help="pre-index a base image (the starting shadow tree)",
                       description="Walk every ext2/3/4 file system of a disk image (raw or qcow2; partition "
                                   "tables and LVM are followed) and save the shadow tree, so that replay and "
                                   "attach start without crawling the image again.")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("-o", "--output", type=Path, metavar="INDEX", help="index file (default: IMAGE.mfsidx)")

    p = sub.add_parser("serve", help="serve a state directory's replica read-only over NBD",
                       description="Serve the replica of a stopped attach, read-only, to NBD clients "
                                   "(nbdinfo, nbdcopy, qemu-img, nbd-client).",
                       epilog="example: mirrorfs serve --state st/vm1 --listen tcp:127.0.0.1:10809 &\n"
                              "         nbdcopy nbd://127.0.0.1/mirrorfs copy.raw")
    _state_arg(p)
    p.add_argument("--listen", action="append", default=[], metavar="ADDR",
                   help="unix:PATH or tcp:HOST:PORT (repeatable; default unix:DIR/nbd.sock); tcp without "
                        "--tls-creds serves the disk to anyone who reaches the port")
    _tls_args(p)
    _group_arg(p)

    p = sub.add_parser("install-unit", help="install the systemd template unit mirrorfs@.service",
                       description="Write mirrorfs@.service, with this installation's Python and package by "
                                   "absolute path, into DIR. Each instance watches one VM (its settings in "
                                   "/etc/mirrorfs/VM.env); the unit is Type=notify (ready once the mirror job "
                                   "is) and hardened. See mirrorfs(1) SYSTEMD.",
                       epilog="example: mirrorfs install-unit && systemctl daemon-reload && "
                              "systemctl enable --now mirrorfs@vm1")
    p.add_argument("--dir", type=Path, default=Path("/etc/systemd/system"),
                   help="where to write the unit (default /etc/systemd/system)")
    return parser


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-creds", type=Path, metavar="DIR",
                   help="serve --listen clients over TLS only (NBD_OPT_STARTTLS), with x509 files named as "
                        "QEMU's tls-creds-x509 takes them: ca-cert.pem, server-cert.pem, server-key.pem; "
                        "clients must show a certificate signed by ca-cert.pem")
    p.add_argument("--tls-psk", type=Path, metavar="FILE",
                   help="not supported: Python 3.11's ssl module has no TLS-PSK API; use --tls-creds")


def hash_limit(text: str) -> int | None:
    """--hash-limit: bytes, with K, M or G (powers of 1024); `none`: no hashes at all."""
    text = text.strip()
    if text.lower() == "none":
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    scale = units.get(text[-1:].lower(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size (64M, 1G, 4096) or none: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a size is not negative")
    return value


def diff_limit(text: str) -> int | None:
    """--diff-limit: a size as --hash-limit takes it, at most MAX_FILE_LIMIT; `none`: no diff store."""
    from inference.blobs import MAX_FILE_LIMIT

    value = hash_limit(text)
    if value is not None and value > MAX_FILE_LIMIT:
        raise argparse.ArgumentTypeError(f"at most {MAX_FILE_LIMIT >> 20}M: difflib's cost grows with the lines")
    return value


def _hash_arg(p: argparse.ArgumentParser) -> None:
    """--hash-limit, and the diff store's --diff-limit and --diff-store: what the engine keeps of content."""
    from inference.blobs import DEFAULT_FILE_LIMIT, DEFAULT_STORE_LIMIT
    from inference.hashes import DEFAULT_HASH_LIMIT
    p.add_argument("--hash-limit", type=hash_limit, default=DEFAULT_HASH_LIMIT, metavar="SIZE",
                   help="events of regular files up to SIZE carry the sha256 of their content at the point; larger "
                        "ones say hash_skipped (default 64M; K, M, G suffixes; none: no hashing)")
    p.add_argument("--diff-limit", type=diff_limit, default=DEFAULT_FILE_LIMIT, metavar="SIZE",
                   help="keep the content of each text file up to SIZE that the engine hashes (every version) in "
                        "DIR/blobs.db, so `events --diff` and `publish --diff` can show what a change did "
                        "(default 64K, at most 1M; none: keep nothing)")
    p.add_argument("--diff-store", type=hash_limit, default=DEFAULT_STORE_LIMIT, metavar="SIZE",
                   help="bound of DIR/blobs.db: past it the oldest versions go first (default 64M)")


def _scope_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scope", action="append", default=[], metavar="GLOB",
                   help="attribute file data (modify events) only where GLOB can match, e.g. '/etc/**' "
                        "(repeatable); creates, deletes, renames and attribute changes stay exact everywhere")
    g.add_argument("--scope-from-subscribers", action="store_true",
                   help="with --follow: while every subscriber of the event socket has a path filter, attribute "
                        "file data only where they can match (opt-in: a publisher or `events --follow` reading "
                        "events.jsonl may want more)")


def scope_prefixes(globs: Sequence[str]) -> tuple[str, ...] | None:
    """--scope GLOB... as the path prefixes the engine keeps data attribution under (None: everywhere)."""
    if not globs:
        return None
    from mirrorfs.stream.filters import Filter, FilterError
    try:
        return Filter.make(paths=globs).prefixes()
    except FilterError as exc:
        raise CLIError(f"--scope: {exc}") from None


def format_record(r, as_json: bool) -> str:
    from tap.writelog import Gap, Kind

    if type(r) is Gap:  # seqs the log lost: a line of their own, never a silent jump
        if as_json:
            return json.dumps({"seq": r.last_seq, "kind": "gap", "first_seq": r.first_seq, "last_seq": r.last_seq,
                               "segment": r.segment, "offset": r.offset, "message": str(r)})
        return f"{r.first_seq:>10} {'to ' + str(r.last_seq):<15} {'lost':<6} {r}"
    kind = Kind(r.kind).name
    if as_json:
        return json.dumps({"seq": r.seq, "time_ns": r.time_ns, "kind": kind, "offset": r.offset, "length": r.length})
    stamp = time.strftime("%H:%M:%S", time.localtime(r.time_ns / 1e9)) + f".{r.time_ns % 10**9 // 1000:06d}"
    return f"{r.seq:>10} {stamp} {kind:<6} {r.offset:>14} {r.length:>9}"


def _after_checkpoint(state, since: int, doing: str) -> int:
    """`since`, or the first seq after the checkpoint retention folded the log into (said on stderr)."""
    from tap.retention import current

    ck = current(state.path)
    if ck is None or since > ck.seq:
        return since
    print(f"mirrorfs: the write log up to {ck.describe()} was folded into a checkpoint (attach --retain): {doing} "
          f"from seq {ck.seq + 1}", file=sys.stderr, flush=True)
    return ck.seq + 1


def cmd_log(args: argparse.Namespace) -> None:
    from tap.state import StateDir
    from tap.writelog import LogFollower, read_records

    state = StateDir(args.state)
    state.require_state()
    args.since = _after_checkpoint(state, args.since, "listing")
    out = sys.stdout
    if not args.follow:
        for r in read_records(state.log, since=args.since, until=args.until):
            out.write(format_record(r, args.json) + "\n")
        return
    from inference.wake import DirWake

    with LogFollower(state.log, since=args.since) as follower, DirWake(state.log) as wake:
        while True:
            batch = follower.poll()
            for r in batch:
                if args.until is not None and getattr(r, "first_seq", r.seq) > args.until:
                    return
                out.write(format_record(r, args.json) + "\n")
            out.flush()
            if not batch:
                wake.wait(1.0)  # woken by the next record; the timeout only bounds a missed wake-up


def cmd_replica(args: argparse.Namespace) -> None:
    from tap.retention import reading
    from tap.state import StateDir

    state = StateDir(args.state)
    size = state.require_state()["size"]
    with reading(state.path):  # a fold meanwhile leaves the checkpoint and the log after it alone
        _replica(args, state, size)


def _replica(args: argparse.Namespace, state, size: int) -> None:
    from tap.replica import build_replica
    from tap.retention import current

    base, base_seq = args.base, 0
    ck = current(state.path)
    if ck is not None:
        if args.until is not None and args.until < ck.seq:
            raise CLIError(f"seq {args.until} is before the retained history: the write log up to {ck.describe()} was "
                           f"folded into a checkpoint (attach --retain); the earliest replica is --until {ck.seq}")
        base, base_seq = ck.image, ck.seq  # the disk at ck.seq: --base is not needed (nor used)
    if base is not None and not base.is_file():
        raise CLIError(f"base image {base} does not exist")
    progress = Progress("replica", unit=" rec")
    try:
        last = build_replica(state.log, args.output, size, base=base, base_seq=base_seq, until=args.until,
                             progress=progress,
                             on_gap=lambda gap: print(f"mirrorfs: warning: {gap}; {args.output} lacks their writes",
                                                      file=sys.stderr, flush=True))
    finally:
        progress.close()
    print(f"mirrorfs: wrote {args.output} ({size} bytes) as of seq {last}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    import trio

    from tap import nbd
    from tap.retention import open_replica
    from tap.server import TapBackend, open_listeners, serve_nbd, server_tls_context
    from tap.state import EXPORT_NAME, StateDir

    refuse_tls_psk(args)
    tls = server_tls_context(args.tls_creds) if args.tls_creds is not None else None
    state = StateDir(args.state)
    size = state.require_state()["size"]
    state.lock()  # no attach, so no fold, meanwhile
    replica = open_replica(state.path, state.replica, size, None)
    addrs = args.listen or [f"unix:{state.nbd_socket}"]

    async def main() -> None:
        from functools import partial

        listeners = await open_listeners(addrs, read_only=True)
        exports = {EXPORT_NAME: nbd.Export(name=EXPORT_NAME, size=size, read_only=True)}
        print(f"mirrorfs: serving {state.replica} read-only as export {EXPORT_NAME!r} on {', '.join(addrs)}",
              flush=True)
        if tls is None and any(a.startswith("tcp:") for a in addrs):
            print("mirrorfs: warning: a tcp listener without --tls-creds lets anyone who reaches the port read "
                  "the disk", file=sys.stderr, flush=True)
        with trio.open_signal_receiver(2, 15) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve_nbd, listeners, exports, TapBackend(replica=replica), tls=tls))
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        replica.close()
        state.unlock()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def raw_image(image: Path, workdir: Path) -> Path:
    """A raw view of a base image: itself, or a qcow2 converted by qemu-img into workdir."""
    import subprocess

    if not image.is_file():
        raise CLIError(f"image {image} does not exist")
    with open(image, "rb") as f:
        magic = f.read(4)
    if magic != b"QFI\xfb":
        return image
    out = workdir / (image.name + ".raw")
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"mirrorfs: converting qcow2 {image} to raw {out}", file=sys.stderr)
    # on a terminal, qemu-img's own progress (-p) on stderr: a large image takes minutes
    shown = sys.stderr.isatty()
    proc = subprocess.run(["qemu-img", "convert", *(["-p"] if shown else []), "-O", "raw", str(image), str(out)],
                          stdout=sys.stderr if shown else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise CLIError(f"qemu-img could not convert {image}: {proc.stderr.strip()} (is qemu-utils installed?)")
    return out


def attach_finished(state, owner: int | None = None) -> bool:
    """A following engine ends once the latest attach of its state dir has detached (attach.json says so), or,
    started by attach `owner`, once another attach has taken the state dir over (`owner` was killed: the new
    attach resynchronizes and starts an engine of its own, which replays the log from the start)."""
    info = state.read_attach() or {}
    return bool(info.get("detached")) or (owner is not None and info.get("pid") not in (None, owner))


def check_replay_args(args: argparse.Namespace, state) -> None:
    """Everything `replay` (and `mount`) is given is checked before anything in the state directory changes:
    a wrong argument must not cost the user their events.jsonl."""
    if getattr(args, "metrics", None):
        from mirrorfs.stream.metrics import parse_addr
        parse_addr(args.metrics)  # ValueError with the forms it takes
    for what, path in (("base image", args.base), ("index", args.index)):
        if path is not None and not Path(path).is_file():
            raise CLIError(f"{what} {path} does not exist")
    from tap.retention import current
    if args.base is None and args.index is None and current(state.path) is None:
        attach = state.read_attach() or {}
        if attach.get("sync") != "full":
            used = f" (the attach used {attach['base']})" if attach.get("base") else ""
            raise CLIError(f"the engine needs the disk as it was when recording began: --base IMAGE{used} or "
                           f"--index INDEX (only a log recorded with --sync full holds the whole disk)")


def cmd_replay(args: argparse.Namespace) -> None:
    import contextlib
    import signal

    from tap.retention import reading
    from tap.state import StateDir

    stop: list[int] = []  # first thing: a SIGTERM during start-up must still drain the log, not kill us
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    state = StateDir(args.state)
    size = state.require_state()["size"]
    check_replay_args(args, state)
    state.prepare()  # root's alone (or --group's), whatever an older run or the umask left
    with contextlib.ExitStack() as stack:
        if not args.follow:  # a fold meanwhile leaves the checkpoint and the log after it alone (a live engine
            stack.enter_context(reading(state.path))  # needs no lock: retention follows its reading position)
        _replay(args, state, size, stop)


def _replay(args: argparse.Namespace, state, size: int, stop: list[int]) -> None:
    import signal

    from inference.eventlog import EventLog
    from inference.history import engine_start
    from inference.runner import Runner
    from mirrorfs.stream.live import start_live
    from tap.retention import READING, current
    from tap.state import make_dir, write_json_atomic
    from tap.writelog import LogFollower, last_seq

    workdir = state.path / "engine"
    make_dir(workdir, what="engine directory")
    ck = current(state.path)
    base = raw_image(args.base, workdir) if args.base and ck is None else None
    progress = Progress("index", unit=" inodes")
    engine = engine_start(workdir, size, ck, base=base, index=args.index, vm=args.vm or state.path.name,
                          progress=progress)
    progress.close()
    # from a checkpoint (attach --retain): the events up to it stay as they are, the rest are made again
    since, keep = (ck.seq + 1, ck.seq) if ck is not None else (1, None)
    engine.set_scope(scope_prefixes(getattr(args, "scope", None) or ()))
    engine.hash_limit = args.hash_limit
    if args.hash_limit is not None and args.diff_limit is not None and args.diff_store:
        import sqlite3

        from inference.blobs import BlobStore
        try:
            engine.blobs = BlobStore(state.path / "blobs.db", args.diff_store, args.diff_limit)
        except (OSError, sqlite3.Error) as exc:  # diffs are not worth the events: go on without
            print(f"mirrorfs: warning: no diff store ({state.path}/blobs.db: {exc}): events --diff will say "
                  "'not kept'", file=sys.stderr)
    write_json_atomic(workdir / "source.json", {"base": str(Path(args.base).resolve()) if args.base else None,
                                                "index": str(Path(args.index).resolve()) if args.index else None})

    def mark_reading(segment: int) -> None:
        """Where the live engine reads the log: retention never removes that segment or a later one."""
        write_json_atomic(state.path / READING, {"segment": segment, "pid": os.getpid()})

    if getattr(args, "mount", None) is not None:
        from mirrorfs.view.serve import serve_log
        from tap.state import access
        try:
            serve_log(engine, state, args.mount, follow=args.follow, allow_other=args.allow_other, since=since,
                      keep_until=keep, on_segment=mark_reading if args.follow else None,
                      assemble=args.assemble, group=access().gid,
                      live=lambda follower, events: start_live(args, state.path, engine, follower, events),
                      finished=lambda: bool(stop) or attach_finished(state, args.attach_pid))
        finally:
            engine.close()
        return
    bar = Progress("replay", unit=" rec")
    with EventLog(state.path / "events.jsonl", truncate=True, keep_until=keep) as events, \
            LogFollower(state.log, since) as follower:
        runner = Runner(engine, follower, follow=args.follow, watch=(state.path,),
                        finished=lambda: bool(stop) or attach_finished(state, args.attach_pid))
        if args.follow:
            runner.on_segment = mark_reading
        for sig in (signal.SIGINT, signal.SIGTERM):  # a signal ends the wait at once; the log is still drained
            signal.signal(sig, lambda *_: (stop.append(1), runner.halt()))
        live = start_live(args, state.path, engine, follower, events)  # subscription socket, metrics (issue 5)
        end = last_seq(state.log)
        runner.sinks.append(events.append)
        runner.on_batch = lambda seq: bar(seq, max(end, seq))
        if args.follow and getattr(args, "scope_from_subscribers", False):
            # layered filtering at the engine: what subscribers can match, as they come and go
            runner.before_poll = lambda: engine.set_scope(live.scope)
        try:
            runner.run()
        finally:
            live.close()
            bar.close()
            engine.close()
        print(f"mirrorfs: {events.count} events from {engine.last_seq} records into {events.path}", file=sys.stderr)


def cmd_mount(args: argparse.Namespace) -> None:
    from tap.state import StateDir

    if args.at is not None:
        from mirrorfs.cli.history import mount_at
        args.raw_image = raw_image
        mount_at(args)
        return

    from tap.retention import current

    state = StateDir(args.state)
    state.require_state()
    if args.base is None and args.index is None and current(state.path) is None:
        try:
            source = json.loads((state.path / "engine" / "source.json").read_text())
        except (OSError, ValueError):
            source = {}
        if source.get("index"):
            args.index = Path(source["index"])
        elif source.get("base"):
            args.base = Path(source["base"])
    args.follow, args.mount = False, args.mountpoint
    cmd_replay(args)


def cmd_umount(args: argparse.Namespace) -> None:
    from mirrorfs.view.mount import is_stale, mount_type, unmount

    if mount_type(args.mountpoint) is None:
        raise CLIError(f"nothing is mounted at {args.mountpoint}")
    if not unmount(args.mountpoint, lazy=is_stale(args.mountpoint)):
        raise CLIError(f"{args.mountpoint} is busy (a process has a file open there); "
                       f"fusermount3 -u -z {args.mountpoint} detaches it lazily")


class EscapingFormatter(logging.Formatter):
    """Log lines go to a terminal and may quote guest names: each message is escaped as `ls -b` does (a
    traceback, added after the message, stays as it is). Under systemd (stderr is the journal) each line starts
    with its syslog priority, `<3>` for an error, as sd-daemon(3) reads it."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, fmt: str, journal: bool = False) -> None:
        super().__init__(fmt)
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        from inference.names import escape_name

        record.message = escape_name(record.message)
        line = super().formatMessage(record)
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{line}" if self.journal else line


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device and inode of the journal stream it gave us as stderr."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return bool(ino) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def log_level(verbose: int, quiet: int) -> int:
    return logging.ERROR if quiet and not verbose else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]


OWN_XATTRS = ("fs", "ino", "seq", "mtime", "flags", "blocks")


def stat_view_path(path: Path) -> dict:
    """mirrorfs's facts about one view path, from the view itself: its user.mirrorfs.* xattrs by name (the
    kernel answers user.* only for files and directories: for the others, the parent's fs and st_ino)."""
    import errno
    import os
    import stat as st

    from inference.events import CHATTR_FLAGS, INODE_FLAGS, flag_names

    s = os.lstat(path)
    facts: dict[str, str] = {}
    target = path if st.S_ISREG(s.st_mode) or st.S_ISDIR(s.st_mode) else path.parent
    for name in OWN_XATTRS:
        try:
            facts[name] = os.getxattr(target, "user.mirrorfs." + name).decode("utf-8", "surrogateescape")
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    if "fs" not in facts:
        raise CLIError(f"{path}: not in a mirrorfs view (no user.mirrorfs.fs)")
    out: dict = {"path": str(path), "fs": facts["fs"]}
    if target is not path:
        out |= {"ino": s.st_ino & 0xFFFFFFFF, "seq": None, "time": None, "flags": None, "blocks": s.st_blocks}
        return out
    flags = int(facts.get("flags", "0"), 16)
    seq = int(facts.get("seq", "0"))
    out |= {"ino": int(facts["ino"]), "seq": seq or None, "time": float(facts["mtime"]) if seq else None,
            "flags": flag_names(flags),
            "letters": "".join(INODE_FLAGS[n][1] if n in flag_names(flags) else "-" for n in CHATTR_FLAGS),
            "blocks": int(facts.get("blocks", s.st_blocks))}
    return out


def cmd_stat(args: argparse.Namespace) -> None:
    for path in args.paths:
        facts = stat_view_path(path)
        if args.json:
            print(json.dumps(facts, ensure_ascii=False))
            continue
        from inference.names import escape_name as esc
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(facts["time"])) + f".{facts['time'] % 1 * 1e6:06.0f} UTC"
                if facts["time"] is not None else "as the base image had it")
        print(f"  File: {esc(str(path))}\n    fs: {esc(facts['fs'])}  guest inode: {facts['ino']}\n"
              f"   seq: {facts['seq'] if facts['seq'] is not None else '-'}  ({when})")
        if facts["flags"] is None:
            print(" flags: - (only files and directories carry them)")
        else:
            print(f" flags: {','.join(facts['flags']) or '-'}  ({facts['letters']})")
        print(f"blocks: {facts['blocks']} (i_blocks, 512-byte units)")


def cmd_events(args: argparse.Namespace) -> None:
    from mirrorfs.cli.stream import cmd_events as events_with_filters

    events_with_filters(args)


def cmd_index(args: argparse.Namespace) -> None:
    from inference.engine import build_index

    out = args.output or args.image.with_name(args.image.name + ".mfsidx")
    image = raw_image(args.image, out.parent)
    progress = Progress("index", unit=" inodes")
    start = time.monotonic()
    data = build_index(image, out, progress=progress)
    progress.close()
    n = sum(len(h.tree) for h in data["handlers"].values())
    print(f"mirrorfs: indexed {n} inodes in {len(data['handlers'])} file system(s) in "
          f"{time.monotonic() - start:.2f} s → {out}", file=sys.stderr)


def cmd_install_unit(args: argparse.Namespace) -> None:
    from mirrorfs.cli.service import install_unit

    out = install_unit(args.dir)
    print(f"mirrorfs: wrote {out}; then: systemctl daemon-reload; put SOURCE= (--qmp SOCKET or --domain NAME), "
          "METRICS= and ATTACH_OPTS= in /etc/mirrorfs/VM.env; systemctl enable --now mirrorfs@VM (see mirrorfs(1) "
          "SYSTEMD)", file=sys.stderr)


def cmd_attach(args: argparse.Namespace) -> None:
    from mirrorfs.cli.attach import cmd_attach as attach  # mirrorfs/cli/attach.py: the job, the tap, the engines
    attach(args)


COMMANDS = {"install-unit": cmd_install_unit,
            "attach": cmd_attach, "log": cmd_log, "replica": cmd_replica, "serve": cmd_serve, "replay": cmd_replay,
            "events": cmd_events, "index": cmd_index, "mount": cmd_mount, "umount": cmd_umount, "stat": cmd_stat}


def _stream_commands() -> dict:
    from mirrorfs.cli.stream import COMMANDS as STREAM_COMMANDS  # publish, collect, status (issue 5)
    return STREAM_COMMANDS


COMMANDS.update(_stream_commands())


def _history_commands() -> dict:
    from mirrorfs.cli.history import COMMANDS as HISTORY_COMMANDS  # history, cat, restore (issue 14)
    return HISTORY_COMMANDS


COMMANDS.update(_history_commands())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    from mirrorfs.cli.history import join_at
    args = parser.parse_args(join_at(list(sys.argv[1:] if argv is None else argv)))
    if not args.command:
        parser.print_help()
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("mirrorfs: %(message)s", journal=stderr_is_journal()))
    logging.basicConfig(level=log_level(args.verbose, args.quiet), handlers=[handler])
    from inference.errors import CorruptMetadata
    from tap.attach import AttachError
    from tap.state import StateError, set_group
    user_errors = (CLIError, AttachError, StateError, ValueError, OSError, CorruptMetadata)
    try:
        # umask 0077 (0027 with --group): a backstop, see tap/state
        set_group(getattr(args, "access_group", None), getattr(args, "qemu_group", None))
        COMMANDS[args.command](args)
    except BrokenPipeError:  # `mirrorfs events | head`: the reader has what it wanted; end quietly
        _quiet_stdout()
        return 0
    except user_errors as exc:
        print(f"mirrorfs: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # trio nurseries wrap what their tasks raise
        match, rest = group.split(user_errors)
        if match is None or rest is not None:
            raise
        for exc in _leaves(match):
            print(f"mirrorfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _quiet_stdout() -> None:
    """stdout's reader is gone: point it at /dev/null, so the interpreter's final flush raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())

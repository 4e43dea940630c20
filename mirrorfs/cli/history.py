"""The history subcommands of `mirrorfs` (issue 14): history, cat, restore.

`history` reads the event log through its index (inference/history.py HistoryIndex) and never runs the engine;
`cat` and `restore` replay the engine from the base up to WHEN (inference/history.py engine_at) and read through
inference/view.py, so a file since deleted, or whose blocks were reused, comes back with the bytes it had then.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path

WHEN_HELP = ("a seq of the write log (0: the base image), an ISO-8601 time (2026-12-01T23:57:42Z, or local time "
             "without a zone: 2026-12-01 23:57:42.5), or a time relative to now (-90s, -5min, -2h, -1d); a time "
             "means the state after every record received up to then")
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)(s|sec|m|min|h|hour|d|day)s?")
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_when(text: str, now_ns: int | None = None) -> tuple[int | None, int | None]:
    """WHEN as (seq, None) or (None, time in ns since the epoch); ValueError saying which forms it takes."""
    text = text.strip()
    if text.isdigit():
        return int(text), None
    now_ns = time.time_ns() if now_ns is None else now_ns
    if m := _RELATIVE.fullmatch(text):
        return None, now_ns - int(float(m.group(1)) * _UNIT[m.group(2)] * 1e9)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--at {text!r}: not a seq, an ISO-8601 time or a relative time ({WHEN_HELP})") from None
    return None, int(when.timestamp() * 1e9)  # naive: local time, as date(1) and touch -d read it


def join_at(argv: list[str]) -> list[str]:
    """`--at -90s` as `--at=-90s`: argparse takes a value that starts with '-' for an option otherwise."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--at":
            value = next(it, None)
            out.append(a if value is None else f"--at={value}")
        else:
            out.append(a)
    return out


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def add_parsers(sub, state_arg, raw_image) -> None:
    """Called by main.py with its --state argument and its raw_image (qcow2 bases) (cli.main is not imported:
    no cycle)."""
    def _state_arg(p: argparse.ArgumentParser) -> None:
        state_arg(p)
        p.set_defaults(raw_image=raw_image)

    p = sub.add_parser(
        "history", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="every version of a file or directory the engine saw, renames followed (no replay)",
        description="List every version of the file or directory at PATH that the engine reported, oldest first: "
                    "seq, time, event kind, the path it had then (renames are followed, both ways), size, mode, "
                    "owner and the SHA-256 of a regular file's content. Works for paths that no longer exist. "
                    "Read from DIR/events.jsonl through an index (DIR/history.db, brought up to date on each call), "
                    "never by running the engine. See mirrorfs-history(1).",
        epilog="examples:\n  mirrorfs history --state st/vm1 /etc/passwd\n"
               "  mirrorfs history --state st/vm1 --json /home/u/report.odt | jq -r .sha256\n"
               "  mirrorfs cat --state st/vm1 --at 4711 /etc/passwd     # the bytes of the version at seq 4711")
    _state_arg(p)
    p.add_argument("path", metavar="PATH", help="absolute path inside the guest's file system, e.g. /etc/passwd")
    p.add_argument("--fs", metavar="FS", help="only this file system (pN, label or LV name; default: any)")
    p.add_argument("--json", action="store_true", help="one JSON object a line (the events, mirrorfs-events(5))")

    for name in ("cat", "restore"):
        restore = name == "restore"
        p = sub.add_parser(
            name, formatter_class=argparse.RawDescriptionHelpFormatter,
            help="write files and trees as they were at WHEN into DEST" if restore
            else "print a file's bytes as they were at WHEN",
            description=("Write each PATH (a file, or a directory with everything below it) as it was at WHEN into "
                         "DEST, with mode, owner, times and symlinks; special files are made with mknod (root). "
                         if restore else "Write the bytes the file at PATH had at WHEN to stdout. ") +
                        "The engine replays the write log from the base image up to WHEN, so deleted files, and "
                        "files whose blocks the guest has since reused, come back exact. WHEN is " + WHEN_HELP +
                        ". See mirrorfs-history(1).",
            epilog=("examples:\n  mirrorfs restore --state st/vm1 --at -10min /home/u/thesis -o /srv/rescue\n"
                    "  mirrorfs restore --state st/vm1 --at 2026-12-01T23:57:00Z /etc /root -o /srv/rescue\n"
                    "  (DEST/thesis, DEST/etc, DEST/root; nothing is written outside DEST, nothing overwritten)")
            if restore else
            ("examples:\n  mirrorfs cat --state st/vm1 --at -90s /etc/shadow | diff - shadow.now\n"
             "  mirrorfs history --state st/vm1 /var/log/auth.log   # pick a seq, then\n"
             "  mirrorfs cat --state st/vm1 --at 4711 /var/log/auth.log"))
        _state_arg(p)
        p.add_argument("--at", required=True, metavar="WHEN", help=WHEN_HELP)
        p.add_argument("--fs", metavar="FS", help="the file system PATH is on (default: the only one)")
        src = p.add_mutually_exclusive_group()
        src.add_argument("--base", type=Path, metavar="IMAGE",
                         help="the disk image at the start of recording (default: what the last replay used)")
        src.add_argument("--index", type=Path, metavar="INDEX", help="a pre-index of that image (mirrorfs index)")
        if restore:
            p.add_argument("paths", nargs="+", metavar="PATH", help="absolute path in the guest's file system")
            p.add_argument("-o", "--output", required=True, type=Path, metavar="DEST",
                           help="directory to restore into (made if missing); each PATH lands at DEST/NAME")
        else:
            p.add_argument("path", metavar="PATH", help="absolute path in the guest's file system")


# -- history

def cmd_history(args: argparse.Namespace) -> None:
    from inference.history import HistoryIndex
    from inference.names import escape_name as esc
    from mirrorfs.cli.stream import require_events
    from tap.state import StateDir

    state = StateDir(args.state)
    events = require_events(state)
    index = HistoryIndex(events, state.path / "history.db")
    try:
        index.update()
        versions = index.versions(_abs(args.path), args.fs)
    finally:
        index.close()
    if not versions:
        raise ValueError(f"{args.path}: no event names it in {events} (never changed since recording began, or "
                         "never existed)")
    from tap.retention import current
    ck = current(state.path)
    folded = sum(ev.seq < ck.seq for ev in versions) if ck is not None else 0
    if folded:
        print(f"mirrorfs: history before {ck.describe()} was folded into a checkpoint (attach --retain): the first "
              f"{folded} version(s) listed are what the events said then; their content is gone (cat, restore and "
              f"mount --at start at seq {ck.seq})", file=sys.stderr, flush=True)
    out = sys.stdout
    for ev in versions:
        if args.json:
            out.write(ev.to_json() + "\n")
            continue
        mode = f"{ev.mode:04o}" if ev.mode is not None else "-"
        owner = f"{ev.uid}:{ev.gid}" if ev.uid is not None else "-"
        digest = ev.sha256 or ("(over --hash-limit)" if ev.hash_skipped else "-")
        where = f"{esc(ev.old_path)} -> {esc(ev.path)}" if ev.old_path else esc(ev.path)
        size = ev.size if ev.size is not None else "-"
        out.write(f"{ev.seq:>9} {_iso(ev.time)} {ev.kind:<8} {size:>10} {mode} {owner:<11} {digest:<64} "
                  f"{esc(ev.fs)}:{where}\n")


def _abs(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path}: give the path inside the guest's file system, absolute (/etc/passwd)")
    return "/" + "/".join(p for p in path.split("/") if p)


# -- the engine at WHEN

class _At:
    """The engine replayed to WHEN, its replica in a temporary directory (removed on exit)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __enter__(self):
        from inference.view import EngineView
        from tap.retention import current, reading
        from tap.state import StateDir

        args = self.args
        state = StateDir(args.state)
        size = state.require_state()["size"]
        with reading(state.path):  # a fold meanwhile leaves the checkpoint and the log after it alone
            self._start(args, state, size, current(state.path))
        self.view = EngineView(self.engine)
        return self

    def _start(self, args: argparse.Namespace, state, size: int, ck) -> None:
        import tempfile

        from inference.history import engine_at, moment
        from mirrorfs.cli.progress import Progress

        base, index = args.base, args.index
        if ck is not None:  # attach --retain folded the log: the history starts at this checkpoint
            base = index = None
        elif base is None and index is None:
            try:
                source = json.loads((state.path / "engine" / "source.json").read_text())
            except (OSError, ValueError):
                source = {}
            index = Path(source["index"]) if source.get("index") else None
            base = Path(source["base"]) if source.get("base") and index is None else None
            if base is None and index is None and (state.read_attach() or {}).get("sync") != "full":
                raise ValueError("the engine needs the disk as it was when recording began: --base IMAGE or "
                               "--index INDEX (or one `mirrorfs replay` with them first)")
        seq, time_ns = parse_when(args.at)
        self.at = moment(state.log, seq=seq, time_ns=time_ns, now_ns=time.time_ns(), checkpoint=ck)
        self.tmp = Path(tempfile.mkdtemp(prefix="mirrorfs-at-", dir=state.path if os.access(state.path, os.W_OK)
                                         else None))
        try:
            if base is not None:
                base = args.raw_image(base, self.tmp)  # a qcow2 base: converted (main.py raw_image)
            progress = Progress("replay", unit=" rec")
            try:
                self.engine = engine_at(state.log, size, self.at, base=base, index=index, workdir=self.tmp / "engine",
                                        progress=progress, checkpoint=ck)
            finally:
                progress.close()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def fs(self) -> str:
        names = self.view.filesystems()
        if getattr(self.args, "fs", None) is not None:
            if self.args.fs not in names:
                raise ValueError(f"--fs {self.args.fs}: no such file system at {self.when()} (there: "
                                 f"{', '.join(names) or 'none'})")
            return self.args.fs
        if len(names) != 1:
            raise ValueError(f"the disk has {len(names) or 'no'} file systems at {self.when()}"
                             + (f": say which with --fs ({', '.join(names)})" if names else ""))
        return names[0]

    def when(self) -> str:
        return f"seq {self.at.seq}" + (f" ({_iso(self.at.time_ns / 1e9)})" if self.at.by_time else "")

    def lookup(self, fs: str, path: str) -> int:
        from inference.events import path_bytes
        ino = self.view.resolve(fs, path_bytes(_abs(path)))
        if ino is None:
            raise ValueError(f"{path}: did not exist at {self.when()} (mirrorfs history --state "
                             f"{self.args.state} {path} lists when it did)")
        return ino

    def __exit__(self, *exc: object) -> None:
        self.engine.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _read_all(view, fs: str, entry, write) -> None:
    """Every byte of a regular file at the point, through the view's read path; a short read is an error."""
    from inference.ext.content import MAX_READ

    pos = 0
    while pos < entry.size:
        data = view.read(fs, entry.ino, pos, min(MAX_READ, entry.size - pos))
        if not data:
            raise OSError(errno.EIO, f"the engine cannot read byte {pos} of inode {entry.ino} ({entry.size} bytes)")
        write(data)
        pos += len(data)


def cmd_cat(args: argparse.Namespace) -> None:
    with _At(args) as at:
        fs = at.fs()
        entry = at.view.stat(fs, at.lookup(fs, args.path))
        if entry is None or entry.type != "file":
            raise ValueError(f"{args.path}: a {entry.type if entry else 'nothing'} at {at.when()}, not a regular "
                             "file (mirrorfs restore writes trees)")
        out = sys.stdout.buffer
        _read_all(at.view, fs, entry, out.write)
        out.flush()


# -- restore

def cmd_restore(args: argparse.Namespace) -> None:
    dest = args.output
    dest.mkdir(parents=True, exist_ok=True)
    with _At(args) as at:
        fs = at.fs()
        roots = [(p, at.lookup(fs, p)) for p in args.paths]
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            count = 0
            for path, ino in roots:
                name = _abs(path).rsplit("/", 1)[1].encode("utf-8", "surrogateescape") or fs.encode()
                count += Restorer(at.view, fs, root_fd).restore(ino, name)
        finally:
            os.close(root_fd)
    print(f"mirrorfs: restored {count} entries as of {at.when()} into {dest}", file=sys.stderr)


class Restorer:
    """Writes a subtree of the engine's tree below one directory fd. Every name is made with *at() calls relative to
    its parent's fd, never following a symlink (O_NOFOLLOW, O_EXCL, follow_symlinks=False), so no guest name
    (`..`, `/`, a symlink to /etc made earlier in the tree) can lead a write outside DEST; nothing existing is
    overwritten. The walk is iterative (any depth) and holds one fd per level; a directory's names are listed as
    (name, inode) pairs and each entry read only when it is made."""

    def __init__(self, view, fs: str, root_fd: int) -> None:
        self.view, self.fs, self.root_fd = view, fs, root_fd
        self.is_root = os.geteuid() == 0
        self.count = 0
        self.linked: dict[int, bytes] = {}  # inode with several names -> where its first copy went, below root_fd

    def restore(self, ino: int, name: bytes) -> int:
        entry = self.view.stat(self.fs, ino)
        fd = self._make(self.root_fd, name, entry, name)
        stack = [(fd, entry, iter(self.view.children(self.fs, ino)), name)] if fd is not None else []
        try:
            while stack:
                dfd, dentry, names, where = stack[-1]
                nxt = next(names, None)
                if nxt is None:
                    self._attrs(dfd, dentry)  # last: its own mode may forbid writing, its mtime moves with names
                    os.close(dfd)
                    stack.pop()
                    continue
                cname, cino = nxt
                centry = self.view.stat(self.fs, cino)
                if centry is None:
                    continue
                cfd = self._make(dfd, cname, centry, where + b"/" + cname)
                if cfd is not None:
                    stack.append((cfd, centry, iter(self.view.children(self.fs, cino)), where + b"/" + cname))
        finally:
            for dfd, _, _, _ in stack:
                os.close(dfd)
        return self.count

    def _make(self, parent: int, name: bytes, e, where: bytes) -> int | None:
        """Make one entry (`where`: its path below root_fd, made of names this restore made); a directory's fd is
        returned open (its attributes wait for its contents)."""
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            print(f"mirrorfs: warning: skipped a name no kernel makes: {name!r}", file=sys.stderr)
            return None
        self.count += 1
        mode = stat.S_IMODE(e.mode)
        if e.type != "dir" and e.links > 1:
            first = self.linked.get(e.ino)
            if first is not None:  # another name of a file already restored: a hard link, as in the guest
                os.link(first, name, src_dir_fd=self.root_fd, dst_dir_fd=parent, follow_symlinks=False)
                return None
            self.linked[e.ino] = where
        if e.type == "dir":
            os.mkdir(name, 0o700, dir_fd=parent)
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        if e.type == "file":
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
            try:
                with os.fdopen(os.dup(fd), "wb", buffering=0) as out:
                    _read_all(self.view, self.fs, e, out.write)
                self._attrs(fd, e)
            finally:
                os.close(fd)
            return None
        if e.type == "symlink":
            os.symlink(e.target or b"", name, dir_fd=parent)
        elif e.type in ("fifo", "chardev", "blockdev") and (self.is_root or e.type == "fifo"):
            kind = {"fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}[e.type]
            os.mknod(name, kind | 0o600, e.rdev if e.type != "fifo" else 0, dir_fd=parent)
            os.chmod(name, mode, dir_fd=parent)  # just made by mknod (EEXIST otherwise): not a symlink
        else:
            print(f"mirrorfs: warning: {name!r}: a {e.type} is not restored"
                  + ("" if e.type == "socket" else " (device nodes need root)"), file=sys.stderr)
            self.count -= 1
            return None
        if self.is_root:
            os.chown(name, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
        os.utime(name, ns=(e.atime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)
        return None

    def _attrs(self, fd: int, e) -> None:
        if self.is_root:
            os.fchown(fd, e.uid, e.gid)  # before the mode: a chown clears set-id bits
        os.fchmod(fd, stat.S_IMODE(e.mode))
        os.utime(fd, ns=(e.atime_ns, e.mtime_ns))


def mount_at(args: argparse.Namespace) -> None:
    """`mirrorfs mount --at WHEN`: the read-only view of every file system as of WHEN (the engine replayed up to
    then, nothing followed), served until SIGINT/SIGTERM or `mirrorfs umount`. events.jsonl is left alone."""
    from mirrorfs.view.serve import ViewServer
    from tap.state import access

    with _At(args) as at:
        print(f"mirrorfs: the view of {at.when()} at {args.mountpoint}", file=sys.stderr, flush=True)
        ViewServer(at.engine, Path(args.mountpoint), None, allow_other=args.allow_other, assemble=args.assemble,
                   fsname=f"mirrorfs:{args.vm or args.state.name}@{at.at.seq}", group=access().gid).run()


COMMANDS = {"history": cmd_history, "cat": cmd_cat, "restore": cmd_restore}

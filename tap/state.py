"""The state directory: one per watched disk, owned by one attach at a time.

Layout (everything mirrorfs writes for a disk stays in here):
  lock            flock'ed by the running attach
  state.json      facts fixed at creation: disk size, device, export name
  attach.json     the running (or last) attach: pid, device, mode, sync, ready, last seq
  log/            the write log (tap.writelog)
  replica.img     the disk as the log makes it now (tap.replica), with replica.img.seq
  checkpoint/     with retention (tap.retention): S.img (+ .seq), S.mfsidx, S.json: the disk at seq S, where the
                  history starts; the log's segments up to S are gone
  reading.json    the live engine's reading position: retention keeps that segment and the later ones
  retain.lock     held shared by readers of a checkpoint and the log after it (cat, replay): a fold leaves them
  nbd.sock        the NBD socket QEMU's mirror job writes to

Who may read it (issue 9): the guest's whole disk is in here (log/, replica.img, engine/disk.img) and its file
names and changes (events.jsonl), so it is root's alone: the directory 0700, files 0600, sockets 0600, whatever
the umask. `--group NAME` (`set_group`) grants one group READ access: directories 2750 (setgid, so what other
modules create inherits the group), files 0640, the read-only sockets (events.sock, reader listeners) 0660, all
root:NAME. The writable NBD socket QEMU's mirror job writes to (nbd.sock) is never the group's: it stays 0600
unless `--qemu-group NAME` makes it 0660 root:NAME for a QEMU that runs as another user. Modules that are not
access-aware create files 0640 and leave the rest to the umask `main` sets (0077, or 0027 with a group).

Sockets are never chmod'ed or chown'ed by path (a local user who can write to a socket's directory could swap
in a symlink between bind and chmod, and root would change its target): `bind_socket` binds under a umask that
gives the mode, sets the group with lchown, and refuses a directory another user controls.
"""

from __future__ import annotations

import dataclasses
import fcntl
import grp
import hashlib
import json
import os
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPORT_NAME = "mirrorfs"
MAX_UNIX_PATH = 107


class StateError(Exception):
    """The state directory cannot be used; the message names the cause and the fix."""


# -- who may read what (issue 9)

PRIVATE_UMASK, GROUP_UMASK = 0o077, 0o027


@dataclass(frozen=True)
class Access:
    """The modes this process gives what it creates: root's alone, or shared read-only with one group; and
    who may connect to the writable NBD socket: root, or root and the group QEMU runs as."""

    gid: int | None = None
    group: str = ""
    qemu_gid: int | None = None
    qemu_group: str = ""

    @property
    def dir_mode(self) -> int:
        return 0o700 if self.gid is None else 0o2750

    @property
    def file_mode(self) -> int:
        return 0o600 if self.gid is None else 0o640

    @property
    def socket_mode(self) -> int:
        return 0o600 if self.gid is None else 0o660

    def socket_policy(self, *, read_only: bool) -> tuple[int, int | None]:
        """(mode, gid to chown to) of a unix socket: read-only ones are --group's, the writable one (through
        which writes enter the log, the replica and the event stream) only --qemu-group's."""
        if read_only:
            return self.socket_mode, self.gid
        return (0o600, None) if self.qemu_gid is None else (0o660, self.qemu_gid)


_access = Access()
_told: set[str] = set()


def access() -> Access:
    return _access


def resolve_group(name: str, option: str = "--group") -> tuple[int, str]:
    """A group name or a numeric gid → (gid, name for messages)."""
    try:
        return grp.getgrnam(name).gr_gid, name
    except KeyError:
        pass
    if name.isdigit():
        return int(name), name
    raise StateError(f"{option} {name}: no such group on this host (`getent group {name}`; create it with "
                     "groupadd, or give a numeric gid)")


def set_group(name: str | None, qemu_group: str | None = None) -> Access:
    """Set this process's access policy (once, at a command's start, before it creates anything): private
    without a group, group-readable with one; `qemu_group` may connect to the writable NBD socket. Also sets
    the umask that covers modules creating files 0640."""
    global _access
    qgid, qlabel = resolve_group(qemu_group, "--qemu-group") if qemu_group is not None else (None, "")
    if name is None:
        _access = Access(qemu_gid=qgid, qemu_group=qlabel)
        os.umask(PRIVATE_UMASK)
    else:
        gid, label = resolve_group(name)
        _access = Access(gid, label, qgid, qlabel)
        os.umask(GROUP_UMASK)
    return _access


def grant_qemu_group(gid: int) -> str:
    """Let `gid` connect to the writable NBD socket, as --qemu-group would: the group a hypervisor manager says it
    runs QEMU as (libvirt's DAC seclabel). Returns the group's name for messages."""
    global _access
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = str(gid)
    _access = dataclasses.replace(_access, qemu_gid=gid, qemu_group=name)
    return name


def _fix(fd_or_path: int | str | Path, want: int) -> None:
    """Exact mode and group of something we just created (umask-independent)."""
    a = _access
    if isinstance(fd_or_path, int):
        if a.gid is not None:
            os.fchown(fd_or_path, -1, a.gid)
        os.fchmod(fd_or_path, want)  # after fchown, which clears setgid bits
    else:
        if a.gid is not None:
            os.chown(fd_or_path, -1, a.gid)
        os.chmod(fd_or_path, want)


def open_private(path: Path, flags: int) -> int:
    """os.open(O_CREAT) with the policy's file mode and group, whatever the umask; no symlink is followed."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, access().file_mode)
    try:
        _fix(fd, access().file_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dir(path: Path, *, what: str = "directory", fix: bool = True, search_ok: bool = False) -> bool:
    """Create `path` (parents traversable only: 0711) or take an existing one, then make it ours with the
    policy's mode. Refuses a directory (or a symlink) another user owns (they could read or swap what we write).
    `search_ok`: a directory holding sockets may keep o+x (search, no listing) that its owner granted so a
    QEMU of another user reaches nbd.sock; what is inside keeps its own modes. Returns True if it was created."""
    path = Path(path)
    created = False
    if not os.path.lexists(path):
        for parent in reversed([p for p in path.parents if not p.exists()]):
            try:
                os.mkdir(parent)
                os.chmod(parent, 0o711)  # they hold only state directories: search, no listing
            except FileExistsError:
                pass
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid():
        st = os.stat(path)  # our own link (to a bigger disk, say): what it points to must be ours too
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"the {what} {path} is not a directory (or a link another user owns): remove it or "
                         "choose another")
    if st.st_uid != os.geteuid():
        raise StateError(f"the {what} {path} belongs to uid {st.st_uid}, who could read or replace what mirrorfs "
                         f"writes there: remove it, or `chown {os.geteuid()} {path}` if you trust it")
    want = access().dir_mode
    mode = stat.S_IMODE(st.st_mode) & ~(SEARCH_OK if search_ok else 0)
    if created or fix and (mode != want or access().gid not in (None, st.st_gid)):
        _fix(str(path), want)
    return created


SEARCH_OK = 0o001  # o+x on a directory holding sockets: see make_dir


def _tighter(mode: int, want: int) -> bool:
    """Does `mode` grant anything that `want` does not (the setgid bit aside)?"""
    return bool(stat.S_IMODE(mode) & 0o7777 & ~want & ~stat.S_ISGID)


def tighten(root: Path) -> int:
    """Make every entry under `root` follow the policy; returns how many granted more than it does (said once
    per directory on stderr). Symlinks are left alone (never followed); so are sockets, which `bind_socket`
    creates with their exact modes (a live nbd.sock is --qemu-group's, not --group's) and which are removed
    before each bind; `root` itself may keep o+x (SEARCH_OK)."""
    a = access()
    loose = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name) if name != "." else dirpath
            try:
                st = os.lstat(p) if name != "." else os.stat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                continue
            want = a.dir_mode if stat.S_ISDIR(st.st_mode) else a.file_mode
            mode = st.st_mode & ~(SEARCH_OK if name == "." and dirpath == str(root) else 0)
            wrong_group = a.gid is not None and st.st_gid != a.gid
            if stat.S_IMODE(mode) != want or wrong_group:
                loose += _tighter(mode, want)
                if st.st_uid == os.geteuid():
                    _fix(p, want)
    key = str(root)
    if loose and key not in _told:
        _told.add(key)
        print(f"mirrorfs: {root}: {loose} entr{'y' if loose == 1 else 'ies'} granted other local users more than "
              f"{'root' if a.gid is None else 'root and group ' + a.group} should have (guest data): tightened "
              f"to {a.dir_mode & 0o777:o}/{a.file_mode:o}", file=sys.stderr, flush=True)
    return loose


def warn_unreachable(path: Path, gid: int | None = None, group: str = "") -> None:
    """With a group (--group's unless given): say so if an ancestor directory keeps the group out (it needs
    search permission)."""
    a = access()
    if gid is None:
        gid, group = a.gid, a.group
    if gid is None:
        return
    for parent in Path(path).absolute().parents:
        try:
            st = parent.stat()
        except OSError:
            return
        if not (st.st_mode & stat.S_IXOTH or (st.st_mode & stat.S_IXGRP and st.st_gid == gid)):
            print(f"mirrorfs: note: group {group} cannot reach {path}: {parent} is not searchable by it "
                  f"(mode {stat.S_IMODE(st.st_mode):o}); `chmod o+x {parent}` (search only) lets it through",
                  file=sys.stderr, flush=True)
            return


def check_socket_dir(path: Path, what: str) -> None:
    """Refuse a socket path whose directory another user controls: they could swap our socket for theirs
    (QEMU or a reader would then talk to them). Root's or ours is fine, and so is a sticky one (/tmp), where
    no one else may rename or remove what we create."""
    parent = Path(path).absolute().parent
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise StateError(f"{what}: cannot use its directory {parent}: {exc.strerror}") from None
    if st.st_uid not in (0, os.geteuid()):
        raise StateError(f"{what}: its directory {parent} belongs to uid {st.st_uid}, who could swap the socket "
                         "for their own: choose a directory only root can write to")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise StateError(f"{what}: its directory {parent} is writable by other users (mode "
                         f"{stat.S_IMODE(st.st_mode):o}, not sticky), who could swap the socket for their own: "
                         f"choose a directory only root can write to, or `chmod +t {parent}`")


def bind_socket(path: Path, *, read_only: bool, what: str = "") -> socket.socket:
    """A unix stream socket bound at `path` with its final mode and group before anyone can connect: read-only
    ones 0600 (0660 root:GROUP with --group), the writable NBD one 0600 (0660 root:QEMU_GROUP with
    --qemu-group). Nothing is changed by a path another user could swap: the mode comes from the umask at bind
    (0777 & ~umask; restored at once), the group from lchown (a swapped-in symlink changes, never its target);
    then the path must be our socket with that mode, or the bind is undone."""
    path = Path(path)
    check_socket_dir(path, what or f"the socket {path}")
    mode, gid = access().socket_policy(read_only=read_only)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o777 & ~mode)  # process-wide, for one syscall: at worst something created meanwhile
        try:                           # by another thread gets fewer permissions, never more
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != mode \
                or gid is not None and st.st_gid != gid:
            raise StateError(f"the socket {path} was replaced or is not mode {mode:o} right after bind (mode "
                             f"{stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}; a default ACL on {path.parent}?): "
                             "choose a directory only root can write to, without default ACLs")
    except BaseException:
        sock.close()
        raise
    return sock


def fallback_socket_dir(state_path: Path) -> Path:
    """Where sockets go when DIR is too deep for a unix socket path: a private directory in the temp dir
    (never a bare name there, which any local user could take first)."""
    digest = hashlib.sha1(os.fsencode(Path(state_path).absolute())).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mirrorfs-{digest}"


def socket_path(state_path: Path, name: str) -> Path:
    """DIR/NAME, or NAME in `fallback_socket_dir` when that is longer than a unix socket path allows."""
    sock = Path(state_path).absolute() / name
    if len(os.fsencode(sock)) <= MAX_UNIX_PATH:
        return sock
    return fallback_socket_dir(state_path) / name


def prepare_socket(path: Path) -> None:
    """Before bind: the fallback directory made ours and private; a stale socket removed."""
    path = Path(path)
    if path.parent.name.startswith("mirrorfs-") and path.parent.parent == Path(tempfile.gettempdir()):
        make_dir(path.parent, what="socket directory", search_ok=True)
    if path.is_socket():
        path.unlink()


def remove_socket(path: Path) -> None:
    """After the last listener closed: the socket, and the fallback directory if it is empty now."""
    path = Path(path)
    if path.is_socket():
        path.unlink()
    if path.parent.name.startswith("mirrorfs-") and path.parent.parent == Path(tempfile.gettempdir()):
        try:
            path.parent.rmdir()
        except OSError:
            pass


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    _fix(fd, access().file_mode)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class StateDir:
    """Paths and metadata of a state directory; `lock()` makes this process its one writer."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None

    log = property(lambda self: self.path / "log")
    replica = property(lambda self: self.path / "replica.img")
    state_file = property(lambda self: self.path / "state.json")
    attach_file = property(lambda self: self.path / "attach.json")

    @property
    def nbd_socket(self) -> Path:
        """DIR/nbd.sock, or nbd.sock in a private directory in /tmp when DIR is too deep for a socket path."""
        return socket_path(self.path, "nbd.sock")

    def prepare(self) -> None:
        """Create the directory (or take an existing one) with the access policy's modes, tightening what an
        older mirrorfs or a loose umask left readable by others."""
        try:
            make_dir(self.path, what="state directory", fix=False)
            tighten(self.path)
            make_dir(self.path / "log", what="write log directory")
        except OSError as exc:
            raise StateError(f"cannot create the state directory {self.path}: {exc.strerror}") from exc
        warn_unreachable(self.path)

    def lock(self) -> None:
        """Create the directory if needed and take its lock, or explain who holds it."""
        self.prepare()
        fd = open_private(self.path / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = (read_json(self.attach_file) or {}).get("pid", "another process")
            raise StateError(
                f"the state directory {self.path} is in use by pid {holder}: stop that `mirrorfs attach` "
                "(Ctrl-C or SIGTERM) or choose another --state") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def read_state(self) -> dict[str, Any] | None:
        return read_json(self.state_file)

    def require_state(self) -> dict[str, Any]:
        """state.json of a directory that an attach has recorded into, or a clear error."""
        st = self.read_state()
        if st is None or not isinstance(st.get("size"), int):
            raise StateError(
                f"{self.path} is not a mirrorfs state directory (no state.json): "
                "record into it first with `mirrorfs attach --state DIR`")
        return st

    def init_state(self, size: int, device: str) -> dict[str, Any]:
        """Record the disk's facts, or check that they match an earlier attach to this directory."""
        st = self.read_state()
        if st is not None:
            if st.get("size") != size:
                raise StateError(
                    f"the state directory {self.path} records a disk of {st.get('size')} bytes but "
                    f"{device} has {size}: use a new --state for a different disk")
            return st
        st = {"size": size, "device": device, "export": EXPORT_NAME, "created": time.time()}
        write_json_atomic(self.state_file, st)
        return st

    def write_attach(self, info: dict[str, Any]) -> None:
        write_json_atomic(self.attach_file, info)

    def read_attach(self) -> dict[str, Any] | None:
        return read_json(self.attach_file)

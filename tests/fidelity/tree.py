"""The tree a snapshot sees: every path of a mounted file system with the attributes the fidelity promise covers.

snapshot_image mounts a COPY of the image read-write, so ext3/ext4 replay their journal exactly as the kernel
would on the next boot (`-o ro,noload` would show the home locations without the committed transactions), and
the image under test is never modified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

KEEP_DATA = 1 << 20  # files up to this size keep their bytes: replay needs them for truncates and range checks
TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
         stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


@dataclass(slots=True)
class Entry:
    """One path. Hard links are separate entries with the same `ino` (their link group)."""

    type: str
    size: int
    mode: int  # S_IMODE
    uid: int
    gid: int
    mtime_ns: int
    ino: int
    target: str | None = None
    xattrs: dict[str, str] = field(default_factory=dict)  # user.* name -> hex value, as in Mutation.xattr
    sha256: str | None = None
    data: bytes | None = field(default=None, compare=False, repr=False)


Tree = dict[str, Entry]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _entry(full: bytes) -> Entry:
    st = os.lstat(full)
    kind = TYPES.get(stat.S_IFMT(st.st_mode), "unknown")
    e = Entry(kind, st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ino)
    if kind == "symlink":
        e.target = _decode(os.readlink(full))
    else:
        for name in sorted(os.listxattr(full, follow_symlinks=False)):
            if name.startswith("user."):
                e.xattrs[name] = os.getxattr(full, name, follow_symlinks=False).hex()
    if kind == "file":
        h = hashlib.sha256()
        keep = bytearray() if st.st_size <= KEEP_DATA else None
        with open(full, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                if keep is not None:
                    keep += chunk
        e.sha256 = h.hexdigest()
        e.data = bytes(keep) if keep is not None else None
    return e


def snapshot_tree(root: Path) -> Tree:
    """Every path under `root` (as "/", "/a/b"), skipping /lost+found; symlinks are never followed."""
    base = os.fsencode(root)
    tree: Tree = {"/": _entry(base)}
    for dirpath, dirnames, filenames in os.walk(base):
        rel = dirpath[len(base):]
        if not rel:
            dirnames[:] = [d for d in dirnames if d != b"lost+found"]
        for name in [*dirnames, *filenames]:
            tree[_decode(rel + b"/" + name)] = _entry(os.path.join(dirpath, name))
    return tree


@contextmanager
def mounted(image: Path, fstype: str | None = None, options: str = "") -> Iterator[Path]:
    """Loop-mount a copy of `image`; unmount, detach and delete the copy always."""
    with tempfile.TemporaryDirectory(prefix="fidelity-mnt.", dir=image.parent) as td:
        copy, mnt = Path(td) / "copy.img", Path(td) / "mnt"
        shutil.copyfile(image, copy)
        mnt.mkdir()
        loop = subprocess.run(["losetup", "-f", "--show", str(copy)], check=True, capture_output=True,
                              text=True).stdout.strip()
        try:
            p = subprocess.run(["mount", *(["-t", fstype] if fstype else []), *(["-o", options] if options else []),
                                loop, str(mnt)], capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"mount {image} failed: {p.stderr.strip()}")
            try:
                yield mnt
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def snapshot_image(image: Path, fstype: str | None = None) -> Tree:
    """The tree of `image` as the kernel sees it after journal recovery (the image itself is left untouched)."""
    with mounted(image, fstype) as mnt:
        return snapshot_tree(mnt)


def link_groups(tree: Tree) -> dict[str, frozenset[str]]:
    """Non-directory path -> every path sharing its inode (itself included)."""
    by_ino: dict[int, set[str]] = {}
    for path, e in tree.items():
        if e.type != "dir":
            by_ino.setdefault(e.ino, set()).add(path)
    return {p: frozenset(ps) for ps in by_ino.values() for p in ps}


def _only(side: str, tree: Tree, paths: set[str]) -> list[str]:
    """Paths on one side only; more than 5 in one directory become one line (a missed bulk create reads well)."""
    by_dir: dict[str, list[str]] = {}
    for p in sorted(paths):
        by_dir.setdefault(p.rsplit("/", 1)[0] or "/", []).append(p)
    out = []
    for d, ps in by_dir.items():
        if len(ps) > 5:
            out.append(f"only in {side}: {len(ps)} entries of {d!r}, e.g. {ps[:3]}")
        else:
            out += [f"only in {side}: {p!r} ({tree[p].type})" for p in ps]
    return out


FIELDS = ("type", "size", "mode", "uid", "gid", "mtime_ns", "target", "xattrs", "sha256")


def diff_trees(a: Tree, b: Tree, *, ino: bool = False, names: tuple[str, str] = ("replayed", "snapshot"),
               fields: tuple[str, ...] = FIELDS, skip_mtime: set[str] | frozenset[str] = frozenset(),
               dir_size: bool = True) -> list[str]:
    """Readable differences. Inode numbers count as link groups only, unless `ino` (events carry the guest's).
    `skip_mtime`: paths whose mtime no event can carry (directories changed only by their entries). `dir_size`
    False: a directory's size is the room its entries take; it grows with them, and no event carries it."""
    out = _only(names[0], a, a.keys() - b.keys()) + _only(names[1], b, b.keys() - a.keys())
    ga, gb = link_groups(a), link_groups(b)
    for p in sorted(a.keys() & b.keys()):
        ea, eb = a[p], b[p]
        for f in (*fields, *(("ino",) if ino else ())):
            va, vb = getattr(ea, f), getattr(eb, f)
            if va != vb and not (f == "mtime_ns" and p in skip_mtime) and not (
                    f == "size" and ea.type == "dir" and not dir_size):
                if f == "mode":
                    va, vb = oct(va), oct(vb)
                out.append(f"{p!r}: {f} {names[0]}={va!r} {names[1]}={vb!r}")
        # compared on the paths both sides have: a path missing on one side is reported above
        if ea.type != "dir" and (ga.get(p, frozenset()) & b.keys()) != (gb.get(p, frozenset()) & a.keys()):
            out.append(f"{p!r}: hard-link group {names[0]}={sorted(ga.get(p, ()))} {names[1]}={sorted(gb.get(p, ()))}")
    return out

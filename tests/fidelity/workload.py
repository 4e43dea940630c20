"""Randomized file-system workloads: typed operations drawn against a model of the tree.

Each op is drawn from the model's current state, so every op is valid when it runs (rename sources exist, rmdir
only hits empty directories, a hard link never targets a directory). The model also predicts the tree the kernel
must end with, which lets the harness check itself (test_workload_model_matches_kernel) before it judges the
engine. `to_shell` renders one script that runs under busybox ash in the TCG guest and under dash + coreutils on
the host, so both writers run the very same operations.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from hypothesis import strategies as st

TOP = "/fid"  # the workload's own directory; it also touches a few known files of the base tree (images.tree)
NAME_STEMS = ("a b ü ", "f", "文件-", "it's ", "x" * 60 + "-")  # spaces, UTF-8, a quote, long names
MODES = (0o600, 0o640, 0o644, 0o700, 0o755, 0o444)  # no set-id bits: chown would clear them on the kernel side
DIR_MODES = (0o700, 0o755, 0o1777, 0o750)
SIZES = (5000, 0, 1, 100, 1023, 1024, 1025, 4095, 4096, 4097, 12289, 70000)
XATTR_NAMES = ("user.a", "user.mirrorfs.tag", "user." + "n" * 40)
SHELL_COMMANDS = ("cd", "umask", "set", ":", "yes", "head", "dd", "truncate", "mv", "ln", "chmod", "chown", "touch",
                  "mkdir", "rmdir", "rm", "mkfifo", "sync", "[")  # every command to_shell emits (both userlands)
SET_XATTR = "import os,sys;os.setxattr(sys.argv[1],sys.argv[2],bytes.fromhex(sys.argv[3]))"
DEL_XATTR = "import os,sys;os.removexattr(sys.argv[1],sys.argv[2])"


@dataclass(frozen=True, slots=True)
class Op:
    """One operation. Paths are absolute inside the file system; `dest` is where rename and link put the name."""

    kind: str  # create write append overwrite truncate rename link symlink mknod chmod chown utime setxattr
    #            rmxattr mkdir rmdir unlink bulk sync
    path: str = ""
    dest: str = ""
    size: int = 0
    offset: int = 0
    token: str = ""  # file content is (token + "\n") repeated: distinct per op, so every write changes bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    target: str = ""  # symlink target
    name: str = ""  # xattr name; bulk: the entry name prefix
    value: bytes = b""  # xattr value
    count: int = 0  # bulk: entries created in `path`
    when: str = ""  # utime: the date given to touch -d


def pattern(token: str, size: int) -> bytes:
    """What `yes TOKEN | head -c SIZE` prints."""
    unit = (token + "\n").encode()
    return (unit * (size // len(unit) + 1))[:size]


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def join(dirpath: str, name: str) -> str:
    return (dirpath.rstrip("/") + "/" + name) if dirpath != "/" else "/" + name


# ---------------------------------------------------------------- the model

@dataclass
class Node:
    id: int
    type: str  # file dir symlink fifo
    mode: int | None  # None: a base file whose mode the model does not know
    uid: int = 0
    gid: int = 0
    data: bytearray | None = None
    target: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, int] | None = None
    opaque: bool = False  # a base directory holding entries the model does not know: never removed or replaced
    stamp: int = 0  # bumped by utime: mtimes are not modelled, but a sync interval must know one was set
    entry_mtime: bool = False  # a directory whose mtime was last set by an entry change, not by utime


ENTRY_OPS = ("create", "rename", "link", "symlink", "mknod", "mkdir", "rmdir", "unlink", "bulk")


class NodeState(NamedTuple):
    """A node as seen at one step; `id` is the model's inode identity (stable across renames and links)."""

    id: int
    type: str
    mode: int | None
    uid: int
    gid: int
    size: int
    digest: str | None
    target: str | None
    xattrs: frozenset[tuple[str, bytes]]
    stamp: int
    entry_mtime: bool


View = dict[str, NodeState]  # every known path -> its node's state


class Model:
    """The tree as the workload leaves it, by inode identity (hard links are one Node under several names)."""

    def __init__(self, with_base: bool = True) -> None:
        self.nodes: dict[int, Node] = {0: Node(0, "dir", None, children={}, opaque=True)}
        self.next_id = 1
        self.counter = 0  # makes every generated name unique, so none collides with the base tree's names
        if with_base:  # known files of images.tree.make_tree (seed 0)
            self.add("/README", self.new("file", 0o644, data=b"mirrorfs test tree, seed 0\n"))
            for d in ("/links", "/deep", "/xattrs", "/small", "/many"):
                self.add(d, self.new("dir", None, opaque=True))
            linked = self.new("file", 0o644, data=b"hard linked content\n")
            for p in ("/links/original.txt", "/links/hardlink.txt", "/deep/hardlink-elsewhere.txt"):
                self.add(p, linked)
            tagged = self.new("file", 0o644, data=b"file with extended attributes\n")
            tagged.xattrs = {"user.mirrorfs.small": b"value", "user.mirrorfs.binary": bytes(range(256))}
            self.add("/xattrs/tagged.txt", tagged)
            self.add("/small/empty-dir", self.new("dir", None))

    def new(self, type_: str, mode: int | None, *, data: bytes | None = None, target: str | None = None,
            opaque: bool = False) -> Node:
        node = Node(self.next_id, type_, mode, data=bytearray(data) if data is not None else None, target=target,
                    children={} if type_ == "dir" else None, opaque=opaque)
        self.nodes[node.id] = node
        self.next_id += 1
        return node

    def lookup(self, path: str) -> Node | None:
        node = self.nodes[0]
        for name in filter(None, path.split("/")):
            if node.children is None or name not in node.children:
                return None
            node = self.nodes[node.children[name]]
        return node

    def add(self, path: str, node: Node) -> None:
        d = self.lookup(parent(path))
        assert d is not None and d.children is not None and basename(path) not in d.children, path
        d.children[basename(path)] = node.id

    def remove(self, path: str) -> Node:
        d = self.lookup(parent(path))
        assert d is not None and d.children is not None, path
        return self.nodes[d.children.pop(basename(path))]

    def walk(self, node_id: int = 0, path: str = "/") -> Iterator[tuple[str, Node]]:
        node = self.nodes[node_id]
        yield path, node
        for name, child in sorted((node.children or {}).items()):
            yield from self.walk(child, join(path, name))

    def view(self) -> View:
        out: View = {}
        for path, n in self.walk():
            data = bytes(n.data) if n.data is not None else None
            size = len(data) if data is not None else len(n.target.encode()) if n.target is not None else 0
            out[path] = NodeState(n.id, n.type, n.mode, n.uid, n.gid, size,
                                  hashlib.sha256(data).hexdigest() if data is not None else None, n.target,
                                  frozenset(n.xattrs.items()), n.stamp, n.entry_mtime)
        return out

    def fresh_name(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def apply(self, op: Op) -> None:
        """Do to the model what the shell line of `op` does to the kernel's tree."""
        k, n = op.kind, self.lookup(op.path) if op.path else None
        if k in ENTRY_OPS or (k == "write" and n is None):
            for d in {parent(op.path), *([parent(op.dest)] if op.dest else [])}:
                self.lookup(d).entry_mtime = True
        if k == "create":
            self.add(op.path, self.new("file", 0o644, data=b""))
        elif k == "write":
            if n is None:
                self.add(op.path, self.new("file", 0o644, data=pattern(op.token, op.size)))
            else:
                n.data = bytearray(pattern(op.token, op.size))
        elif k == "append":
            n.data += pattern(op.token, op.size)
        elif k == "overwrite":
            chunk = pattern(op.token, op.size)
            n.data[op.offset:op.offset + op.size] = chunk  # past the end: the file grows (offset <= size)
        elif k == "truncate":
            del n.data[op.size:]
            n.data += bytes(op.size - len(n.data))
        elif k == "rename":
            moved = self.remove(op.path)
            if self.lookup(op.dest) is not None:
                self.remove(op.dest)
            self.add(op.dest, moved)
        elif k == "link":
            self.add(op.dest, n)
        elif k == "symlink":
            self.add(op.path, self.new("symlink", 0o777, target=op.target))
        elif k == "mknod":
            self.add(op.path, self.new("fifo", 0o644, data=None))
        elif k == "chmod":
            n.mode = op.mode
        elif k == "chown":
            n.uid, n.gid = op.uid, op.gid
        elif k == "utime":
            n.stamp += 1
            n.entry_mtime = False
        elif k == "setxattr":
            n.xattrs[op.name] = op.value
        elif k == "rmxattr":
            del n.xattrs[op.name]
        elif k == "mkdir":
            self.add(op.path, self.new("dir", 0o755))
        elif k in ("rmdir", "unlink"):
            self.remove(op.path)
        elif k == "bulk":
            d = self.new("dir", 0o755)
            d.entry_mtime = True
            self.add(op.path, d)
            for i in range(op.count):
                self.add(join(op.path, f"{op.name}{i}"), self.new("file", 0o644, data=b""))
        elif k != "sync":
            raise ValueError(f"unknown op {k}")

    # candidates for the next op
    def paths(self, pred) -> list[str]:
        return [p for p, n in self.walk() if p != "/" and pred(n)]

    def dirs(self) -> list[str]:
        return ["/", *self.paths(lambda n: n.type == "dir")]

    def files(self) -> list[str]:
        return self.paths(lambda n: n.type == "file")


# ---------------------------------------------------------------- strategies

class Builder:
    """Appends ops and applies each to the model at once, so the next draw sees the tree as it now is."""

    def __init__(self, with_base: bool = True) -> None:
        self.model = Model(with_base)
        self.ops: list[Op] = []
        self.tokens = 0

    def do(self, op: Op) -> Op:
        self.model.apply(op)
        self.ops.append(op)
        return op

    def token(self) -> str:
        self.tokens += 1
        return f"t{self.tokens}-"

    def new_path(self, dirpath: str, stem: str = "f") -> str:
        return join(dirpath, self.model.fresh_name(stem))


def _rename_dests(m: Model, src: str) -> list[str]:
    """Existing names `src` may replace: a non-directory over another inode's non-directory, a directory over an
    empty directory that is neither its ancestor nor inside it."""
    s = m.lookup(src)
    # busybox mv follows a symlink source when it checks "are the same file": not over what the link points to
    relative = s.type == "symlink" and s.target and not s.target.startswith("/")
    points_to = posixpath.normpath(join(parent(src), s.target)) if relative else None
    out = []
    for p, n in m.walk():
        if p == "/" or n.id == s.id or n.opaque or p == points_to:
            continue
        if s.type != "dir" and n.type not in ("dir",) and p != src:
            out.append(p)
        elif s.type == "dir" and n.type == "dir" and not n.children and not p.startswith(src + "/") \
                and not src.startswith(p + "/"):
            out.append(p)
    return out


KINDS = ("mkdir", "write", "create", "sync", "append", "overwrite", "truncate", "rename", "link", "symlink", "mknod",
         "chmod", "chown", "utime", "setxattr", "rmxattr", "sync", "write", "rename", "overwrite", "deep", "bulk",
         "ephemeral", "sync", "rmdir", "unlink", "unlink", "sync")  # a round; repeats weigh the common ops


def _draw_op(draw: st.DrawFn, b: Builder, kind: str, xattrs: bool) -> bool:
    """Draw and apply one op (or a macro of several) of `kind`; False when the model offers no valid target."""
    m = b.model
    dirs = [d for d in m.dirs() if d.startswith(TOP)] + ["/", "/many", "/small", "/links"]
    files = m.files()
    nondir = m.paths(lambda n: n.type != "dir")
    attr_targets = m.paths(lambda n: n.type in ("file", "dir") and not n.opaque)
    stem = draw(st.sampled_from(NAME_STEMS))
    if kind in ("create", "mkdir", "symlink", "mknod"):
        path = b.new_path(draw(st.sampled_from(dirs)), stem)
        if kind == "symlink":
            target = draw(st.sampled_from(["../README", "nowhere/at all", "ü/" + "t" * 90, TOP]))
            b.do(Op("symlink", path, target=target))
        else:
            b.do(Op(kind, path))
    elif kind == "write":
        existing = draw(st.booleans()) and files
        path = draw(st.sampled_from(files)) if existing else b.new_path(draw(st.sampled_from(dirs)), stem)
        b.do(Op("write", path, size=draw(st.sampled_from(SIZES) | st.integers(0, 20000)), token=b.token()))
    elif kind in ("append", "overwrite", "truncate"):
        if not files:
            return False
        path = draw(st.sampled_from(files))
        size = len(m.lookup(path).data)
        if kind == "append":
            b.do(Op("append", path, size=draw(st.integers(1, 9000)), token=b.token()))
        elif kind == "overwrite":
            offset = draw(st.integers(0, size))  # in the middle; at the end it extends the file
            b.do(Op("overwrite", path, offset=offset, size=draw(st.integers(1, 6000)), token=b.token()))
        else:
            b.do(Op("truncate", path, size=draw(st.integers(0, max(size // 2, 1)) | st.integers(size, size + 9000))))
    elif kind == "rename":
        srcs = [p for p in m.paths(lambda n: not n.opaque) if p != TOP]
        if not srcs:
            return False
        src = draw(st.sampled_from(srcs))
        over = _rename_dests(m, src)
        if over and draw(st.booleans()):
            dest = draw(st.sampled_from(over))
        else:
            dests = [d for d in dirs if d != src and not d.startswith(src + "/")]
            dest = b.new_path(draw(st.sampled_from(dests)), stem)
        b.do(Op("rename", src, dest=dest))
    elif kind == "link":
        if not files:
            return False
        b.do(Op("link", draw(st.sampled_from(files)), dest=b.new_path(draw(st.sampled_from(dirs)), stem)))
    elif kind in ("chmod", "chown", "utime", "setxattr", "rmxattr"):
        if kind in ("setxattr", "rmxattr") and not xattrs:
            return False
        targets = attr_targets if kind != "rmxattr" else [p for p in attr_targets if m.lookup(p).xattrs]
        if not targets:
            return False
        path = draw(st.sampled_from(targets))
        n = m.lookup(path)
        if kind == "chmod":
            b.do(Op("chmod", path, mode=draw(st.sampled_from(DIR_MODES if n.type == "dir" else MODES))))
        elif kind == "chown":
            b.do(Op("chown", path, uid=draw(st.sampled_from([0, 1000, 65534])), gid=draw(st.sampled_from([0, 100]))))
        elif kind == "utime":
            b.tokens += 1
            b.do(Op("utime", path, when=f"20{b.tokens % 30 + 1:02d}-0{b.tokens % 9 + 1}-1{b.tokens % 10} 04:05:06"))
        elif kind == "setxattr":
            value = draw(st.binary(min_size=0, max_size=300))
            b.do(Op("setxattr", path, name=draw(st.sampled_from(XATTR_NAMES)), value=value))
        else:
            b.do(Op("rmxattr", path, name=draw(st.sampled_from(sorted(n.xattrs)))))
    elif kind == "rmdir":
        empty = m.paths(lambda n: n.type == "dir" and not n.opaque and not n.children)
        empty = [p for p in empty if p != TOP]
        if not empty:
            return False
        b.do(Op("rmdir", draw(st.sampled_from(empty))))
    elif kind == "unlink":
        if not nondir:
            return False
        b.do(Op("unlink", draw(st.sampled_from(nondir))))
    elif kind == "deep":  # a chain of directories and a file at the bottom
        path = draw(st.sampled_from(dirs))
        for _ in range(draw(st.integers(5, 12))):
            path = b.do(Op("mkdir", b.new_path(path, "d"))).path
        b.do(Op("write", b.new_path(path, stem), size=draw(st.sampled_from(SIZES)), token=b.token()))
    elif kind == "bulk":  # a large directory: hundreds of entries (htree on ext3/4)
        prefix = m.fresh_name(stem) + "."  # never a fresh name: those end in the counter
        b.do(Op("bulk", b.new_path(draw(st.sampled_from(dirs)), "big"), name=prefix, count=draw(st.integers(150, 400))))
    elif kind == "ephemeral":  # created and deleted between two syncs
        path = b.do(Op("write", b.new_path(draw(st.sampled_from(dirs)), stem), size=draw(st.sampled_from(SIZES)),
                       token=b.token())).path
        if draw(st.booleans()):
            b.do(Op("chmod", path, mode=0o600))
        b.do(Op("unlink", path))
    elif kind == "sync":
        if b.ops and b.ops[-1].kind == "sync":
            return False
        b.do(Op("sync"))
    return True


@st.composite
def workloads(draw: st.DrawFn, *, max_rounds: int = 2, xattrs: bool = True, with_base: bool = True) -> list[Op]:
    """A valid op sequence: mkdir TOP, then 1..max_rounds rounds that each try every kind of KINDS once in a drawn
    order (so even hypothesis's simplest example covers every op), ending with a sync: everything is flushed."""
    b = Builder(with_base)
    b.do(Op("mkdir", TOP))
    for _ in range(draw(st.integers(1, max_rounds))):
        for kind in draw(st.permutations(KINDS)):
            _draw_op(draw, b, kind, xattrs)
    if b.ops[-1].kind != "sync":
        b.do(Op("sync"))
    return b.ops


def fixed_workload(xattrs: bool = True) -> list[Op]:
    """Every op kind at least once, in a fixed order, syncs between phases: the smoke test's workload."""
    b = Builder()
    top, t = TOP, b.token
    for op in [
        Op("mkdir", top), Op("mkdir", f"{top}/a b"), Op("mkdir", f"{top}/ü 文件"), Op("sync"),
        Op("create", f"{top}/empty"), Op("write", f"{top}/a b/it's here", size=5000, token=t()),
        Op("write", f"{top}/ü 文件/data.bin", size=70000, token=t()), Op("symlink", f"{top}/sym", target="../README"),
        Op("symlink", f"{top}/long-sym", target="x/" + "y" * 100), Op("mknod", f"{top}/fifo"), Op("sync"),
        Op("append", f"{top}/a b/it's here", size=3000, token=t()),
        Op("overwrite", f"{top}/ü 文件/data.bin", offset=30000, size=5000, token=t()),
        Op("truncate", f"{top}/ü 文件/data.bin", size=20000), Op("truncate", f"{top}/empty", size=10000),
        Op("append", "/README", size=10, token=t()), Op("sync"),
        Op("rename", f"{top}/a b/it's here", dest=f"{top}/moved"),
        Op("rename", f"{top}/ü 文件", dest=f"{top}/a b/dir moved"),
        Op("write", f"{top}/victim", size=100, token=t()), Op("sync"),
        Op("rename", f"{top}/moved", dest=f"{top}/victim"),
        Op("link", "/links/original.txt", dest=f"{top}/hard"), Op("link", f"{top}/victim", dest=f"{top}/hard2"),
        Op("rename", "/links/hardlink.txt", dest=f"{top}/from-base"), Op("sync"),
        Op("chmod", f"{top}/victim", mode=0o640), Op("chmod", f"{top}/a b", mode=0o700),
        Op("chown", f"{top}/hard", uid=1000, gid=100), Op("utime", f"{top}/empty", when="2001-02-03 04:05:06"),
        Op("utime", f"{top}/a b/dir moved", when="2002-03-04 05:06:07"), Op("sync"),
        *([Op("setxattr", f"{top}/victim", name="user.a", value=b"one"),
           Op("setxattr", f"{top}/a b", name="user.mirrorfs.tag", value=bytes(range(200))),
           Op("rmxattr", "/xattrs/tagged.txt", name="user.mirrorfs.small"), Op("sync")] if xattrs else []),
        Op("bulk", f"{top}/big", name="entry ", count=300), Op("sync"),
        Op("unlink", f"{top}/big/entry 7"), Op("unlink", f"{top}/fifo"), Op("unlink", f"{top}/hard2"),
        Op("rmdir", "/small/empty-dir"), Op("sync"),
    ]:
        b.do(op)
    deep = top
    for i in range(10):
        deep = b.do(Op("mkdir", f"{deep}/d{i}")).path
    b.do(Op("write", f"{deep}/bottom", size=100, token=t()))
    b.do(Op("sync"))
    b.do(Op("write", f"{top}/ephemeral", size=9000, token=t()))  # created and deleted between two syncs
    b.do(Op("rename", f"{top}/ephemeral", dest=f"{top}/ephemeral2"))
    b.do(Op("unlink", f"{top}/ephemeral2"))
    b.do(Op("mkdir", f"{top}/gone"))
    b.do(Op("rmdir", f"{top}/gone"))
    b.do(Op("sync"))
    return b.ops


def make_known_base(root: Path) -> None:
    """Only the base-tree paths the model knows, with their contents, modes and links: a base for running
    workloads on a plain directory in a fraction of the time images.tree.make_tree takes."""
    for path, node in Model(with_base=True).walk():
        full = root / path.lstrip("/")
        if node.type == "dir":
            full.mkdir(parents=True, exist_ok=True)
        elif node.type == "file":
            first = next(p for p, n in Model(with_base=True).walk() if n.id == node.id)
            if first != path:
                os.link(root / first.lstrip("/"), full)
                continue
            full.write_bytes(bytes(node.data))
            full.chmod(node.mode)
            for name, value in node.xattrs.items():
                os.setxattr(full, name, value)


def model_after(ops: list[Op], with_base: bool = True) -> Model:
    m = Model(with_base)
    for op in ops:
        m.apply(op)
    return m


# ---------------------------------------------------------------- rendering

def _q(path: str) -> str:
    """A shell word for a path: relative to the mount (./...) so no name can look like an option."""
    return shlex.quote("." + path)


def _line(op: Op) -> str:
    p, k = _q(op.path), op.kind
    gen = f"yes {shlex.quote(op.token)} | head -c {op.size}"
    return {
        "create": lambda: f": > {p}",
        "write": lambda: f"{gen} > {p}",
        "append": lambda: f"{gen} >> {p}",
        "overwrite": lambda: f"{gen} | dd of={p} bs={op.size} count=1 iflag=fullblock oflag=seek_bytes "
                             f"seek={op.offset} conv=notrunc 2>/dev/null",
        "truncate": lambda: f"truncate -s {op.size} {p}",
        "rename": lambda: f"mv -f -T {p} {_q(op.dest)}",
        "link": lambda: f"ln {p} {_q(op.dest)}",
        "symlink": lambda: f"ln -s {shlex.quote(op.target)} {p}",
        "mknod": lambda: f"mkfifo {p}",
        "chmod": lambda: f"chmod {op.mode:o} {p}",
        "chown": lambda: f"chown {op.uid}:{op.gid} {p}",
        "utime": lambda: f"touch -c -m -d {shlex.quote(op.when)} {p}",
        "setxattr": lambda: f"\"$PY\" -c '{SET_XATTR}' {p} {shlex.quote(op.name)} '{op.value.hex()}'",
        "rmxattr": lambda: f"\"$PY\" -c '{DEL_XATTR}' {p} {shlex.quote(op.name)}",
        "mkdir": lambda: f"mkdir {p}",
        "rmdir": lambda: f"rmdir {p}",
        "unlink": lambda: f"rm -f {p}",
        "bulk": lambda: (f"mkdir {p}; i=0; while [ $i -lt {op.count} ]; do : > {_q(join(op.path, op.name))}$i; "
                         f"i=$((i+1)); done"),
        "sync": lambda: "sync",
    }[k]()


def to_shell(ops: list[Op], python: str | None = None) -> str:
    """A POSIX sh script (busybox ash or dash) that runs `ops` in $MNT and stops at the first failure.

    busybox has no setfattr/getfattr, so xattr ops need `python` (the host runner passes sys.executable);
    without it they are refused here rather than silently dropped.
    """
    needs_py = any(op.kind in ("setxattr", "rmxattr") for op in ops)
    if needs_py and python is None:
        raise ValueError("xattr ops need a python interpreter; the busybox guest has no setfattr")
    head = ["set -e", "umask 022", 'cd "$MNT"', *([f"PY={shlex.quote(python)}"] if needs_py else [])]
    return "\n".join([*head, *(_line(op) for op in ops), "sync", ""])


def has_xattr_ops(ops: list[Op]) -> bool:
    return any(op.kind in ("setxattr", "rmxattr") for op in ops)

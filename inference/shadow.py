"""The shadow tree: what the engine believes a file system holds, inode by inode and name by name.

File-system agnostic: handlers fill it from their own layouts. Paths are bytes as the guest wrote them.
"""

from __future__ import annotations

import ctypes
import gc
import operator
import stat
from array import array
from bisect import bisect_left
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate, chain

ROOT_INO = 2
MAX_DEPTH = 4096  # a path deeper than this means a cycle (hostile metadata)


@contextmanager
def gc_paused(*, freeze: bool = False) -> Iterator[None]:
    """Build or load a whole tree without the cyclic collector: it makes ~10 container objects per inode and no
    garbage cycles (keep it so: a cycle made in here waits for the next collection), and collections scanning
    the growing heap for none took 3/4 of loading an index (100k inodes: 0.9 -> 0.22 s of CPU). `freeze`: what
    exists at the end is long-lived (a process that just loaded its index): move it out of the collector's
    generations, so no later collection walks it (the first one after a load took ~0.2 s per 100k inodes).
    Frozen objects are still freed by refcounting, but a cycle among them never is. At the end the C heap's free
    pages go back to the system (trim_heap): bulk work leaves many."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was:
            gc.enable()
        trim_heap()


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). A bulk build frees
    a few hundred bytes per inode of arrays and lists that glibc otherwise keeps in the process (RSS after building
    a 100k-inode index: 396 -> 188 B/inode)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


@dataclass(slots=True)
class Node:
    ino: int
    type: str
    mode: int = 0            # full st_mode
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    links: int = 0
    rdev: int = 0
    atime_ns: int = 0
    blocks: int = 0          # i_blocks in 512-byte units (st_blocks), huge_file already applied
    flags: int = 0           # i_flags as the guest's FS_IOC_GETFLAGS gives them (immutable, append-only, ...)
    target: bytes | None = None                     # symlinks
    xattrs: dict[str, bytes] | None = None
    extents: tuple[tuple[int, int, int, bool], ...] = ()  # (logical, physical, length, uninit)
    meta_blocks: tuple[int, ...] = ()                # blocks of the mapping itself (extent tree, indirect)
    xattr_block: int = 0
    gen: int = 0            # changes when the inode number is reused for a new file
    name_ctime_ns: int = 0  # ctime when its names last changed: a later rename must move it
    entries_changed: bool = False  # a directory whose entries changed since its mtime was last reported
    sig: int = 0            # the handler's checksum of what else it compares cheaply (e.g. the block-map root)
    names: tuple[tuple[int, bytes], ...] = ()  # (parent ino, name); a tuple: 48 B for one name, a list 88

    @property
    def perm(self) -> int:
        return stat.S_IMODE(self.mode)


# Unmodified inodes live in a _Base: one array per field, a row per inode (found by bisection of a sorted inode
# column), names in one bytes blob (~100 B per inode, against ~700 as objects; an index loads as a few arrays).
# A node or directory read through `nodes`/`children` gets an object in the store's overlay, which wins from then
# on, so callers may change it in place as they would a dict's value; `peek` and `entries` read without one (for
# walks of the whole tree).

_FIXED = ("mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "links", "rdev", "atime_ns", "blocks", "flags",
          "xattr_block", "gen", "name_ctime_ns", "entries_changed", "sig")
_ino_of, _type_of, _extents_of, _meta_of = (operator.attrgetter(f) for f in ("ino", "type", "extents", "meta_blocks"))
_parent_of, _name_of, _row_ino_of, _kind_of = (operator.itemgetter(i) for i in range(4))
INO, TYPE, FIXED, EXT_AT, EXT_N, META_AT, META_N, NAME_AT, NAME_N = 0, 1, 2, 18, 19, 20, 21, 22, 23  # _Base.cols
_CHILD, _NAME = 1, 2  # a name row is an entry of its directory (children), a name of its inode (Node.names), or both
CHUNK = 4096          # buffered nodes or names moved into the arrays at a time while building
_MISSING = object()
POOL_MAX = 4096       # distinct values shared by the nodes a _Base makes (a hostile tree may have one per inode)


def _pack(values: array | list) -> array | list:
    """`values` in the narrowest array that holds them: the bytes per row are the memory of a loaded tree. A list
    if no array does (a value past 64 bits from a hostile inode stays exact)."""
    if not values:
        return array("B")
    try:
        lo, hi = min(values), max(values)
        for tc in ("BHIQ" if lo >= 0 else "bhiq"):
            bits = array(tc).itemsize * 8
            if hi < 1 << bits if tc.isupper() else -(1 << bits - 1) <= lo and hi < 1 << bits - 1:
                return array(tc, values)
    except TypeError:
        pass
    return list(values)


def _extend(cols: list, i: int, values: tuple) -> None:
    """cols[i].extend(values); an array that cannot hold them becomes a list (hostile 64-bit values, rare)."""
    col = cols[i]
    n = len(col)
    try:
        col.extend(values)
    except (OverflowError, TypeError):
        del col[n:]
        cols[i] = list(col) + list(values)


class _Base:
    """A frozen tree as columns: `cols` per node (see INO...NAME_N) in the order nodes were added, found by
    bisection in `inos` (sorted) and `by_ino` (their rows); name rows (parent, inode, name) in one blob, the rows of
    each node's names (`nm`) and of each directory's entries (`ch`), in the order they were added."""

    def __init__(self) -> None:
        self.cols: list = [array("B") for _ in range(NAME_N + 1)]
        self.inos: array | list = array("B")
        self.by_ino: array | list = array("B")
        self.types: tuple[str, ...] = ()
        self.ext: list = [array("B") for _ in range(4)]  # (logical, physical, length, uninit) of all extents
        self.meta: array | list = array("B")
        self.targets: dict[int, bytes] = {}              # by inode: few (symlinks)
        self.xattrs: dict[int, dict[str, bytes]] = {}
        self.rw_parent: array | list = array("B")
        self.rw_ino: array | list = array("B")
        self.rw_end: array | list = array("B")           # end of each row's name in `blob`
        self.blob = b""
        self.nm: array | list = array("B")
        self.ch: array | list = array("B")
        self.dirs: array | list = array("B")             # sorted directory inodes with (maybe empty) entries
        self.dir_at: array | list = array("B")
        self.dir_n: array | list = array("B")
        self._pool: dict[int, int] = {}                 # (not saved: see ShadowTree.__getstate__)

    def __len__(self) -> int:
        return len(self.cols[INO])

    def row(self, ino: int) -> int:
        inos = self.inos
        p = bisect_left(inos, ino)
        return self.by_ino[p] if p < len(inos) and inos[p] == ino else -1

    def name(self, k: int) -> bytes:
        end = self.rw_end
        return self.blob[end[k - 1] if k else 0:end[k]]

    def first_name(self, r: int) -> tuple[int, bytes] | None:
        if not self.cols[NAME_N][r]:
            return None
        k = self.nm[self.cols[NAME_AT][r]]
        return self.rw_parent[k], self.name(k)

    def node(self, r: int) -> Node:
        c = self.cols
        ino = c[INO][r]
        f = [col[r] for col in c[FIXED:EXT_AT]]
        # One object for equal values: a node made resident, or the view's copy of it, keeps 28-36 B per int.
        ctime, pool = f[5], self._pool
        for i in (4, 8, 13):                # mtime, atime, name_ctime: mostly the ctime
            if f[i] == ctime:
                f[i] = ctime
        if len(pool) < POOL_MAX:
            for i in (0, 1, 2, 10):         # mode, uid, gid, flags: few distinct values
                f[i] = pool.setdefault(f[i], f[i])
        a, n = c[EXT_AT][r], c[EXT_N][r]
        if n:
            lg, ph, ln, un = (x[a:a + n] for x in self.ext)
            extents = tuple(zip(lg, ph, ln, map(bool, un), strict=True))
        else:
            extents = ()
        a, n = c[META_AT][r], c[META_N][r]
        meta = tuple(self.meta[a:a + n])
        a, n = c[NAME_AT][r], c[NAME_N][r]
        names = tuple((self.rw_parent[k], self.name(k)) for k in self.nm[a:a + n])
        xattrs = self.xattrs.get(ino)
        return Node(ino, self.types[c[TYPE][r]], *f[:11], self.targets.get(ino), dict(xattrs) if xattrs else None,
                    extents, meta, f[11], f[12], f[13], bool(f[14]), f[15], names)

    def dir_row(self, d: int) -> int:
        r = bisect_left(self.dirs, d)
        return r if r < len(self.dirs) and self.dirs[r] == d else -1

    def entries(self, j: int) -> dict[bytes, int]:
        a = self.dir_at[j]
        ino, name = self.rw_ino, self.name
        return {name(k): ino[k] for k in self.ch[a:a + self.dir_n[j]]}


class _Stage:
    """A tree being built in bulk (an index of a whole file system): nodes and names are buffered and moved into
    growing arrays CHUNK at a time, by calls that loop in C (one attrgetter map per column), so no object per inode
    outlives the build and adding costs about what a dict insert did; `freeze` sorts them into a _Base."""

    def __init__(self) -> None:
        self.inos: set[int] = set()   # membership while building (the only per-inode objects; gone after)
        self.cols: list = [array("q") for _ in range(NAME_AT)]
        self.types: dict[str, int] = {}
        self.buf: list[Node] = []
        self.ext: list = [array("q") for _ in range(4)]
        self.meta: list = [array("q")]
        self.targets: dict[int, bytes] = {}
        self.xattrs: dict[int, dict[str, bytes]] = {}
        self.dirs: set[int] = set()
        self.rows: list = [array("q"), array("q"), array("q"), array("B")]  # parent, ino, name end, kind
        self.rbuf: list[tuple[int, bytes, int, int]] = []
        self.blob = bytearray()

    def add(self, node: Node) -> None:
        """Take `node` as it is when its chunk is moved (changes to it after that are not seen)."""
        self.inos.add(node.ino)
        if node.type == "dir":
            self.dirs.add(node.ino)
        self.buf.append(node)
        if node.names:  # (now: in the order they come with names added later)
            self.rbuf.extend((parent, name, node.ino, _NAME) for parent, name in node.names)
        if len(self.buf) >= CHUNK or len(self.rbuf) >= CHUNK:
            self._flush()

    def add_row(self, parent: int, name: bytes, ino: int, kind: int) -> None:
        if kind & _CHILD:
            self.dirs.add(parent)
        self.rbuf.append((parent, name, ino, kind))
        if len(self.rbuf) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        buf, rbuf = self.buf, self.rbuf
        if buf:
            self.buf = []
            types = list(map(_type_of, buf))
            for t in dict.fromkeys(types):  # (numbered as they first come: a set's order varies by process)
                if t not in self.types:
                    self.types[t] = len(self.types)
            extents, meta = list(map(_extents_of, buf)), list(map(_meta_of, buf))
            ext_n, meta_n = list(map(len, extents)), list(map(len, meta))
            ext_at = list(accumulate(ext_n, initial=len(self.ext[0])))[:-1]
            meta_at = list(accumulate(meta_n, initial=len(self.meta[0])))[:-1]
            cols = self.cols
            _extend(cols, INO, tuple(map(_ino_of, buf)))
            _extend(cols, TYPE, tuple(map(self.types.__getitem__, types)))
            for i, f in enumerate(_FIXED):
                _extend(cols, FIXED + i, tuple(map(operator.attrgetter(f), buf)))
            for i, values in ((EXT_AT, ext_at), (EXT_N, ext_n), (META_AT, meta_at), (META_N, meta_n)):
                _extend(cols, i, tuple(values))
            if any(ext_n):
                for i, values in enumerate(zip(*chain.from_iterable(extents), strict=True)):
                    _extend(self.ext, i, values)
            if any(meta_n):
                _extend(self.meta, 0, tuple(chain.from_iterable(meta)))
            for node in buf:
                if node.target is not None:
                    self.targets[node.ino] = node.target
                if node.xattrs:
                    self.xattrs[node.ino] = node.xattrs
        if rbuf:
            self.rbuf = []
            names = list(map(_name_of, rbuf))
            ends = tuple(accumulate(map(len, names), initial=len(self.blob)))[1:]
            self.blob += b"".join(names)
            rows = self.rows
            for i, values in ((0, tuple(map(_parent_of, rbuf))), (1, tuple(map(_row_ino_of, rbuf))), (2, ends),
                              (3, tuple(map(_kind_of, rbuf)))):
                _extend(rows, i, values)

    def freeze(self) -> _Base:
        self._flush()
        b = _Base()
        inos = self.cols[INO]
        order = sorted(range(len(inos)), key=inos.__getitem__)
        b.inos = _pack(list(map(inos.__getitem__, order)))
        b.by_ino = _pack(order)
        parent, rino, end, kind = self.rows
        every = range(len(kind))
        both = kind.count(_CHILD | _NAME) == len(kind)  # (an index build: each name is an entry and a node's name)
        nm = sorted(every if both else (k for k in every if kind[k] & _NAME), key=rino.__getitem__)
        ch = sorted(every if both else (k for k in every if kind[k] & _CHILD), key=parent.__getitem__)
        sorted_at, sorted_n = _groups(b.inos, nm, rino)
        name_at, name_n = array("q", sorted_at), array("q", sorted_n)  # (by row: scattered from inode order)
        for p, r in enumerate(order):
            name_at[r], name_n[r] = sorted_at[p], sorted_n[p]
        del order, sorted_at, sorted_n
        b.cols = [_pack(c) for c in self.cols] + [_pack(name_at), _pack(name_n)]
        b.types = tuple(self.types)
        b.ext, b.meta = [_pack(x) for x in self.ext], _pack(self.meta[0])
        b.targets, b.xattrs = self.targets, self.xattrs
        b.rw_parent, b.rw_ino, b.rw_end, b.blob = _pack(parent), _pack(rino), _pack(end), bytes(self.blob)
        b.nm, b.ch = _pack(nm), _pack(ch)
        dirs = sorted(self.dirs)
        dir_at, dir_n = _groups(dirs, ch, parent)
        b.dirs, b.dir_at, b.dir_n = _pack(dirs), _pack(dir_at), _pack(dir_n)
        return b


def _groups(keys: array | list, rows: list[int], key_of: array | list) -> tuple[list[int], list[int]]:
    """For each of the sorted `keys`: where its run starts in `rows` (sorted by key_of[row]) and how long it is.
    Rows whose key is not in `keys` belong to no run (a name of an inode that is not in the tree)."""
    at, n = [], []
    j, end = 0, len(rows)
    for key in keys:
        while j < end and key_of[rows[j]] < key:
            j += 1
        a = j
        while j < end and key_of[rows[j]] == key:
            j += 1
        at.append(a)
        n.append(j - a)
    return at, n


class _Store(MutableMapping):
    """A dict's behaviour over the rows of a _Base: a row read through `get`/`[]` is made resident (an object in
    `_over`, which wins from then on), a deleted one is remembered in `_gone`. Subclasses say how rows are found
    (`_row`), made (`_make`) and listed (`_keys`), and which keys a bulk build holds (`_staged_keys`)."""

    def __init__(self) -> None:
        self._reset(_Base())

    def _reset(self, base: _Base) -> None:
        self._base = base
        self._over: dict = {}
        self._gone: set[int] = set()
        self._len = len(self._keys())
        self._staged: _Stage | None = None
        # (hot: get and `in` run per inode many times a point) the row finder as a bound method, one frame less
        # than _row; and the smallest and largest key of the base: a key outside them (a new inode of a file
        # system that grows) is no row, with no bisection
        self._find = self._finder(base)
        self._lo, self._hi = self._span(base)

    def _row(self, key: int) -> int:
        raise NotImplementedError

    def _finder(self, base: _Base):  # noqa: ANN202 - _row's function, bound to `base`
        raise NotImplementedError

    def _span(self, base: _Base) -> tuple[int, int]:
        """(smallest, largest) key with a row in `base`; (1, 0) for none."""
        raise NotImplementedError

    def _make(self, row: int):  # noqa: ANN202 - a Node or a dict
        raise NotImplementedError

    def _keys(self) -> array | list:
        raise NotImplementedError

    def _staged_keys(self) -> set[int]:
        raise NotImplementedError

    def get(self, key: int, default=None):  # noqa: ANN001, ANN201 - dict.get's signature
        value = self._over.get(key)
        if value is not None:
            return value
        if not self._lo <= key <= self._hi and self._staged is None:
            return default
        if key in self._gone:
            return default
        r = self._find(key)
        if r < 0:
            if self._staged is not None and key in self._staged_keys():
                raise RuntimeError(f"{key} is being built in bulk: only membership is known until the end")
            return default
        value = self._over[key] = self._make(r)
        return value

    def _copy(self, key: int):  # noqa: ANN202
        """get() without making the row resident: a copy, unless it already is (do not change what you get)."""
        value = self._over.get(key)
        if value is not None or not self._lo <= key <= self._hi or key in self._gone:
            return value
        r = self._find(key)
        return self._make(r) if r >= 0 else None

    def __getitem__(self, key: int):  # noqa: ANN204
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        if key in self._over or (self._staged is not None and key in self._staged_keys()):
            return True
        return self._lo <= key <= self._hi and key not in self._gone and self._find(key) >= 0

    def __setitem__(self, key: int, value) -> None:  # noqa: ANN001
        if key not in self:
            self._len += 1
        self._over[key] = value
        self._gone.discard(key)

    def __delitem__(self, key: int) -> None:
        if key not in self:
            raise KeyError(key)
        self._over.pop(key, None)
        if self._row(key) >= 0:
            self._gone.add(key)
        self._len -= 1

    def __len__(self) -> int:
        return self._len + (len(self._staged_keys()) if self._staged is not None else 0)

    def __iter__(self) -> Iterator[int]:
        yield from list(self._over)
        over, gone = self._over, self._gone
        for key in self._keys():
            if key not in over and key not in gone:
                yield key

    def values(self) -> Iterator:  # type: ignore[override] - base rows as copies (_copy), not made resident
        return map(self._copy, self)

    def items(self) -> Iterator[tuple]:  # type: ignore[override]
        return ((key, self._copy(key)) for key in self)


class NodeStore(_Store):
    """inode -> Node."""

    @property
    def resident(self) -> dict[int, Node]:
        """The nodes made resident (do not change the dict): `resident.get(ino) or get(ino)` is get(ino) with no
        Python call for a resident node, for loops that look up many."""
        return self._over

    def _row(self, key: int) -> int:
        return self._base.row(key)

    def _finder(self, base: _Base):  # noqa: ANN202
        return base.row

    def _span(self, base: _Base) -> tuple[int, int]:
        return (base.inos[0], base.inos[-1]) if len(base.inos) else (1, 0)

    def _make(self, row: int) -> Node:
        return self._base.node(row)

    def _keys(self) -> array | list:
        return self._base.cols[INO]

    def _staged_keys(self) -> set[int]:
        return self._staged.inos

    def peek(self, ino: int) -> Node | None:
        """The node without making it resident: a copy, unless it already is (do not change what you get)."""
        return self._copy(ino)

    def first_name(self, ino: int) -> tuple[int, bytes] | None:
        """node.names[0] (None: no node, or no name) without making the node resident: what path() walks."""
        node = self._over.get(ino)
        if node is not None:
            return node.names[0] if node.names else None
        if ino in self._gone:
            return None
        r = self._base.row(ino)
        return self._base.first_name(r) if r >= 0 else None


class ChildStore(_Store):
    """directory inode -> {name: inode}."""

    def _row(self, key: int) -> int:
        return self._base.dir_row(key)

    def _finder(self, base: _Base):  # noqa: ANN202
        return base.dir_row

    def _span(self, base: _Base) -> tuple[int, int]:
        return (base.dirs[0], base.dirs[-1]) if len(base.dirs) else (1, 0)

    def _make(self, row: int) -> dict[bytes, int]:
        return self._base.entries(row)

    def _keys(self) -> array | list:
        return self._base.dirs

    def _staged_keys(self) -> set[int]:
        return self._staged.dirs

    def entries(self, d: int) -> dict[bytes, int]:
        """A directory's entries without making them resident: a copy, unless they already are (do not change)."""
        entries = self._copy(d)
        return {} if entries is None else entries


class ShadowTree:
    """Inodes and directory entries; `path()` walks names up to the root.

    `nodes` (ino -> Node) and `children` (dir ino -> {name: ino}) behave as dicts; `peek` and `entries` read
    without making a node or directory resident (a walk of the whole tree); `bulk()` builds a whole tree."""

    def __init__(self) -> None:
        self.nodes = NodeStore()
        self.children = ChildStore()
        self._stage: _Stage | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    def __getstate__(self) -> dict:
        """For the index file: the base's arrays (pickled as bytes, loaded by copying them), the overlay folded in."""
        if self._stage is not None:
            raise RuntimeError("a tree is pickled while being built in bulk")
        n, c = self.nodes, self.children
        base = n._base if not (n._over or n._gone or c._over or c._gone) else self._rebased()
        return {"base": {k: v for k, v in base.__dict__.items() if not k.startswith("_")}}

    def __setstate__(self, state: dict) -> None:
        base = _Base()
        if isinstance(state, dict) and isinstance(state.get("base"), dict):
            base.__dict__.update(state["base"])  # (another format: an empty tree; load_index refuses the file)
        self.__init__()
        self._adopt(base)

    def _rebased(self) -> _Base:
        """The tree as one new base: every node and every entry, whether in the base or the overlay."""
        stage = _Stage()
        for node in self.nodes.values():
            stage.add(node)
        for d, entries in self.children.items():
            stage.dirs.add(d)
            for name, ino in entries.items():
                stage.add_row(d, name, ino, _CHILD)
        return stage.freeze()

    def _adopt(self, base: _Base) -> None:
        self.nodes._reset(base)
        self.children._reset(base)

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Build an empty tree in bulk: add_node and add_name go to arrays, `in` answers for what was added,
        anything else about those nodes raises until the end (so nothing per inode outlives the build)."""
        if len(self.nodes) or len(self.children):
            raise RuntimeError("bulk() builds an empty tree")
        self._stage = self.nodes._staged = self.children._staged = _Stage()
        try:
            yield
        finally:
            stage, self._stage = self._stage, None
            self._adopt(stage.freeze())

    def peek(self, ino: int) -> Node | None:
        """nodes.get without making the node resident: do not change what it returns."""
        return self.nodes.peek(ino)

    def entries(self, d: int) -> dict[bytes, int]:
        """children.get(d, {}) without making the directory resident: do not change what it returns."""
        return self.children.entries(d)

    def add_node(self, node: Node) -> None:
        stage = self._stage
        if stage is not None:
            if node.ino in stage.inos:
                raise RuntimeError(f"inode {node.ino} added twice in bulk")
            stage.add(node)
            return
        self.nodes[node.ino] = node
        if node.type == "dir":
            self.children.setdefault(node.ino, {})

    def drop_node(self, ino: int) -> Node | None:
        node = self.nodes.pop(ino, None)
        self.children.pop(ino, None)
        return node

    def add_name(self, parent: int, name: bytes, ino: int) -> None:
        stage = self._stage
        if stage is not None:
            stage.add_row(parent, name, ino, _CHILD | _NAME if ino in stage.inos else _CHILD)
            return
        entries = self.children.get(parent)  # (setdefault of a MutableMapping is three Python calls)
        if entries is None:
            entries = self.children[parent] = {}
        entries[name] = ino
        node = self.nodes.get(ino)
        if node is not None and (parent, name) not in node.names:
            node.names += ((parent, name),)

    def remove_name(self, parent: int, name: bytes) -> int | None:
        entries = self.children.get(parent)
        ino = entries.pop(name, None) if entries is not None else None
        if ino is not None and (node := self.nodes.get(ino)) is not None and (parent, name) in node.names:
            i = node.names.index((parent, name))
            node.names = node.names[:i] + node.names[i + 1:]
        return ino

    def lookup(self, parent: int, name: bytes) -> int | None:
        entries = self.children.get(parent)
        return entries.get(name) if entries is not None else None

    def path(self, ino: int) -> bytes | None:
        """The first path of an inode, or None if it is not reachable from the root."""
        parts: list[bytes] = []
        seen: set[int] = set()
        first_name = self.nodes.first_name
        while ino != ROOT_INO:
            first = first_name(ino)
            if first is None or ino in seen or len(parts) > MAX_DEPTH:
                return None
            seen.add(ino)
            ino, name = first
            parts.append(name)
        return b"/" + b"/".join(reversed(parts))

    def name_path(self, parent: int, name: bytes) -> bytes | None:
        base = self.path(parent)
        if base is None:
            return None
        return (base.rstrip(b"/") or b"") + b"/" + name

"""One ext2/3/4 file system: block writes in, Mutations out, at its consistency points.

The handler reads the file system through a metadata view: the engine's replica (the disk as the write
log makes it) overlaid with the blocks of committed jbd2 transactions not yet written home. Each write
is classified by block: journal, superblock, group descriptors, bitmaps, inode table, a mapping block
(extent tree / indirect), an xattr block, a directory block or file data. Metadata writes mark inodes
and directories dirty; at a consistency point (a jbd2 commit; for ext2, the end of a batch of writes,
with names waiting until inode and directory agree) the dirty ones are re-read and reconciled with the
shadow tree. File data is attributed through the block map; blocks nobody owns yet (delayed
allocation) need no buffering: their content is in the replica, and a newly allocated extent counts as
changed content when its allocation commits.
"""

from __future__ import annotations

import logging
import math
import operator
import zlib
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from inference import names as N
from inference.blockmap import BlockMap
from inference.errors import CorruptMetadata
from inference.events import ErrorEvent, Kind, Mutation, fs_path
from inference.ext import layout as L
from inference.ext import reader as R
from inference.ext.journal import JournalGap, JournalTracker, parse_journal_superblock
from inference.reconcile import Change, Context, Reconciler
from inference.shadow import ROOT_INO, Node, ShadowTree, gc_paused
from inference.zeros import data_end

log = logging.getLogger("mirrorfs.ext")

ReadFn = Callable[[int, int], bytes]
# A writeback burst is over once the file system has been quiet this long (record time): what only the end of a
# burst can tell is decided then (a reused inode number whose old name is still listed, a data block that came
# without its inode's record, which ctime a later rename must move). Gaps inside one burst measured here are
# mostly under 2 ms, between two syncs of a busy guest 20 ms and more.
SETTLE_NS = 10_000_000
# With a journal, data that came with no commit after it (writeback of a rewrite in place; the rest of a sync whose
# commit is still on its way) waits this long (record time) for a commit before it is a consistency point of its
# own: a sync's commit follows its data by tens of ms, so the new bytes, the new size and the new mtime are shown
# as one version. Meanwhile reads get the bytes of the last point (ExtHandler.read_data).
DATA_WAIT_NS = 1_000_000_000
# The bytes a data write replaced are kept until their point (ExtHandler.preimage), at most this many per file
# system; past it the point comes at once.
MAX_PREIMAGE = 64 << 20
HOLD_SLACK_NS = 1_000_000  # a held size's bound is ticked this late (reconcile keeps float seconds)
MAX_ERRORS_PER_POINT = 20
MAX_DIR_ROUNDS = 64  # bound on directory levels discovered at one consistency point (the rest waits)
MAX_RETRY_ROUNDS = 8  # bound on re-reading waiting directories within one point
# The block map of one file system holds at most this many ranges (~270 bytes each with the node's extents): an inode
# past the per-inode caps is refused by the reader, one that would push the total past this is tracked without data.
MAX_FS_EXTENTS = 1 << 22
MAX_BAD_REMEMBERED = 4096  # refused entries remembered as reported (dir, name, ino); past it the oldest go
# Inode-table blocks remembered as last compared (_changed_inodes), at most this many bytes of them; the least
# recently compared go first. A checkpoint rewrites at home the blocks its commit already brought: compared with
# the block they were last time, their inodes need no parsing.
ITABLE_MEMO_BYTES = 8 << 20
_unpack_large = L.INODE_LARGE_ST.unpack_from
_ext_header, _ext_leaves = L.EXTENT_HEADER_ST.unpack_from, L.EXTENT_LEAF_ST.iter_unpack
_crc32c = R.crc32c.crc32c
_CLO, _CHI = L.INODE_CSUM_LO_OFFSET, L.INODE_CSUM_HI_OFFSET
_FAST_TYPES = {0x8000: "file", 0x4000: "dir"}
_XATTR_MAGIC_BYTES = L.XATTR_MAGIC.to_bytes(4, "little")
_ZERO8 = bytes(8)
_U64 = (1 << 64) - 1
SIGN32, NS = R.SIGN32, R.NS
_CMP_FIELDS = operator.attrgetter("mode", "uid", "gid", "size", "mtime_ns", "links", "gen", "atime_ns", "blocks",
                                  "flags", "sig")  # what _changed_inodes compares of a tree node


@dataclass
class Stats:
    writes: int = 0
    transactions: int = 0
    gaps: int = 0
    unowned_blocks: int = 0
    metadata_blocks: int = 0
    errors: int = 0
    skipped_data: int = 0      # data writes outside the scope, not attributed


@dataclass
class _Dirty:
    itable: set[int] = field(default_factory=set)    # inode-table blocks
    inodes: set[int] = field(default_factory=set)    # mapping or xattr block changed
    dirs: set[int] = field(default_factory=set)
    gdt: bool = False
    now: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.itable or self.inodes or self.dirs or self.gdt)


class ExtHandler:
    """The shadow tree of one ext file system, kept current from its block writes.

    `scope` (an inode predicate, None: everything) narrows data attribution: data writes to a file outside it
    give no modify ranges. Metadata is always processed, so creates, deletes, renames (into the scope too) and
    attribute changes stay exact. The predicate is judged on the names the tree holds when the write arrives and
    cached per inode until names change; the same scope over the same log gives the same events.
    """

    scope: Callable[[int], bool] | None = None   # class defaults: also for handlers unpickled from older indexes
    _scope_cache: dict[int, bool] | None = None
    # Name policy (inference/names.py): refused entries already reported, per directory, while they stay listed
    # ({dir: {(name, ino)}}, oldest directory first), and the ones found since the last report (at most
    # MAX_ERRORS_PER_POINT, the rest only counted). Class defaults: also for handlers unpickled from older indexes.
    _bad_seen: dict[int, frozenset[tuple[bytes, int]]] | None = None
    _bad_new: list[tuple[int, bytes, int, str]] | None = None
    _bad_more = 0
    # _changed_inodes' memo: inode-table block -> (its bytes, per inode slot the tree node's compared fields when
    # those bytes matched them, else None); and, during a point, the inodes it parsed and found changed (_inode).
    _itable_memo: dict[int, tuple[bytes, list[tuple | None]]] | None = None
    _memo_bytes = 0
    _parsed: dict[int, R.Inode] | None = None
    _parsed_at: list[tuple[int, int, int, tuple]] | None = None  # (block, slot, ino, compared fields) of each

    def __init__(self, read: ReadFn, *, name: str = "", vm: str = "") -> None:
        self._read_home = read
        self.overlay: dict[int, bytes] = {}
        self.name, self.vm = name, vm
        self.stats = Stats()
        self.reader = R.ExtReader(self._read_view)
        self.geo = geo = self.reader.geo
        self.tree = ShadowTree()
        self.blocks = BlockMap()
        self.meta_owner: dict[int, int] = {}         # extent-tree / indirect block -> inode
        self.xattr_owners: dict[int, set[int]] = {}  # shared xattr block -> inodes
        self.reconciler = Reconciler(self.tree)
        self.reconciler.block_size = geo.block_size
        self.dirty = _Dirty()
        self.retry_dirs: set[int] = set()
        self.broken: dict[int, float] = {}  # inode -> time it was first unreadable
        self.pending_data: dict[int, list[tuple[int, int]]] = {}
        self._clear_preimage()
        self.last_seq = self.last_ns = 0
        self._quiet_done = True
        self._settled_done = False
        self._layout()
        self.journal: JournalTracker | None = None
        self.jmap: list[tuple[int, int, int]] = []  # (fs start, length, journal start)
        self._jrev: dict[int, int] = {}
        if geo.has_journal and geo.journal_inum:
            self._open_journal()

    def __getstate__(self) -> dict:
        """For the index file: everything but the function that reads the disk (see attach)."""
        state = self.__dict__.copy()
        state["_read_home"] = None
        state["preimage"], state["preimage_bytes"], state["data_since"] = {}, 0, None
        state.pop("scope", None)      # a live setting, not part of the index
        state.pop("_scope_cache", None)
        for derived in ("_itable_memo", "_memo_bytes", "_parsed", "_parsed_at"):  # (class defaults when loaded)
            state.pop(derived, None)
        return state

    def attach(self, read: ReadFn) -> None:
        """Point a loaded (unpickled) handler at the disk it describes."""
        self._read_home = read
        self.reconciler.block_size = self.geo.block_size
        if not hasattr(self, "preimage"):
            self._clear_preimage()

    def set_scope(self, scope: Callable[[int], bool] | None) -> None:
        self.scope, self._scope_cache = scope, None

    def in_scope(self, ino: int) -> bool:
        """Is the inode's data attributed? (cached; the cache is dropped when names change)"""
        if self.scope is None:
            return True
        if self._scope_cache is None:
            self._scope_cache = {}
        hit = self._scope_cache.get(ino)
        if hit is None:
            hit = self._scope_cache[ino] = bool(self.scope(ino))
        return hit

    # -- reading through the metadata view

    def read_home(self, offset: int, length: int) -> bytes:
        """The file system's bytes as the replica holds them (file data lives here)."""
        return self._read_home(offset, length)

    def read_data(self, offset: int, length: int) -> bytes:
        """File data as of the last consistency point: the replica, with the bytes of data writes that no point
        has taken yet put back (a reader of the view must not see a version the tree does not show)."""
        data = self._read_view(offset, length)  # data=journal: a committed block not yet at home is in the overlay
        if not self.preimage:
            return data
        bs = self.geo.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        if last - first + 1 > len(self.preimage):
            blocks = sorted(b for b in self.preimage if first <= b <= last)
        else:
            blocks = [b for b in range(first, last + 1) if b in self.preimage]
        if not blocks:
            return data
        out = bytearray(data)
        for b in blocks:
            old, lo = self.preimage[b], b * bs
            a, z = max(lo, offset), min(lo + bs, offset + length)
            out[a - offset:z - offset] = old[a - lo:z - lo]
        return bytes(out)

    def before_write(self, offset: int, length: int, old: bytes | None = None) -> None:
        """A write of [offset, offset+length) is about to reach the replica (`old`: its bytes now, if the caller
        has them): keep what it replaces in files' data blocks until the consistency point that takes it."""
        if self.journal is None or self.preimage_bytes >= MAX_PREIMAGE:
            return
        bs = self.geo.block_size
        first, count = offset // bs, -(-(offset + length) // bs) - offset // bs
        for phys, n, ino, _logical in self.blocks.owners(first, count):
            if self.scope is not None and not self.in_scope(ino):
                continue
            for b in range(phys, phys + n):
                if b in self.preimage or b in self.overlay:
                    continue  # in the overlay: read_data gives the committed copy until the home write
                lo = b * bs
                if old is not None and offset <= lo and lo + bs <= offset + len(old):
                    block = old[lo - offset:lo - offset + bs]
                else:  # a partial block, or a write of zeroes: read what the replica holds still
                    block = self._read_home(lo, bs)
                self.preimage[b] = block
                self.preimage_bytes += bs
                if self.preimage_bytes >= MAX_PREIMAGE:
                    return

    def file_owners(self, offset: int, length: int) -> dict[int, int]:
        """Regular files (with attributed data) whose blocks [offset, offset+length) of the volume holds, as of
        the last point: inode -> size shown. For diffs: their content is hashed before the write lands."""
        bs = self.geo.block_size
        first, count = offset // bs, -(-(offset + length) // bs) - offset // bs
        out: dict[int, int] = {}
        for _phys, _n, ino, _logical in self.blocks.owners(first, count):
            node = self.tree.peek(ino)  # a look only: a write to a base file must not make its node resident
            if node is not None and node.type == "file" and (self.scope is None or self.in_scope(ino)):
                out[ino] = node.size
        return out

    def _clear_preimage(self) -> None:
        self.preimage: dict[int, bytes] = {}  # data block -> its bytes at the last consistency point
        self.preimage_bytes = 0
        self.data_since: int | None = None    # record time of the oldest data write no point has taken

    def inline_bytes(self, ino: int, size: int) -> bytes | None:
        """An INLINE_DATA_FL inode's bytes up to `size` (past the inline bytes zeros, as ext4_readpage_inline
        reads them); None if the inode keeps no inline data, b"" if its record cannot be read now."""
        try:
            inode = self._inode(ino)
            if not inode.flags & L.INLINE_DATA_FL:
                return None
            return R.inline_data(inode, self.geo)[:size].ljust(size, b"\0")
        except CorruptMetadata:
            return b""  # a torn or hostile record: a short read, so the view answers EIO

    def read_view(self, offset: int, length: int) -> bytes:
        """Metadata as of the last commit: home locations overlaid with committed journal blocks."""
        return self._read_view(offset, length)

    def _read_view(self, offset: int, length: int) -> bytes:
        if not self.overlay:
            return self._read_home(offset, length)
        bs = self.geo.block_size if hasattr(self, "geo") else 1024
        first, last = offset // bs, (offset + length - 1) // bs
        if not any(b in self.overlay for b in range(first, last + 1)):
            return self._read_home(offset, length)
        out = bytearray(self._read_home(first * bs, (last - first + 1) * bs))
        for b in range(first, last + 1):
            if (blk := self.overlay.get(b)) is not None:
                out[(b - first) * bs:(b - first + 1) * bs] = blk
        start = offset - first * bs
        return bytes(out[start:start + length])

    def _layout(self) -> None:
        """Static block classes: superblock, descriptors, bitmaps, inode tables."""
        geo, descs = self.geo, self.reader.descs
        self.sb_block = 0 if geo.block_size > 1024 else 1
        self.gdt = set(R.gdt_blocks(geo))
        self.bitmaps = {d.block_bitmap for d in descs} | {d.inode_bitmap for d in descs}
        per_block = geo.block_size // geo.inode_size
        itable_blocks = -(-geo.inodes_per_group // per_block)
        self.itables = sorted((d.inode_table, d.inode_table + itable_blocks, g) for g, d in enumerate(descs))
        self._itable_starts = [t[0] for t in self.itables]

    def _open_journal(self) -> None:
        geo = self.geo
        try:
            inode = self.reader.inode(geo.journal_inum)
            extents, _ = R.file_map(inode, geo, self.reader.read_block)
            jsb = parse_journal_superblock(self.reader.read_block(extents[0].physical))
        except (CorruptMetadata, IndexError) as exc:
            self._error(f"journal unreadable ({exc}); following home locations only")
            return
        self.jmap = sorted((e.physical, e.length, e.logical) for e in extents)
        self._jrev = {}
        self.journal = JournalTracker(jsb, self._read_jblock, fs_blocks=geo.blocks_count)

    def _read_jblock(self, j: int) -> bytes:
        for start, length, logical in self.jmap:
            if logical <= j < logical + length:
                return self._read_home((start + j - logical) * self.geo.block_size, self.geo.block_size)
        return b""

    # -- the initial tree

    def index(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Build the shadow tree from the current view (the base image, or the disk after a full sync)."""
        self.reader.bulk = True
        try:
            with gc_paused():
                if self.fast_index and self.bulk_index and (self.geo.inodes_count - self._free_inodes()
                                                            >= self.bulk_min_inodes):
                    from inference.ext import bulkindex  # (imports numpy: only an index needs it)
                    if bulkindex.index(self, progress):
                        return
                with self.tree.bulk():
                    self._index(progress)
        finally:
            self.reader.bulk, self.reader._window = False, None

    def _index(self, progress: Callable[[int, int], None] | None) -> None:
        tree = self.tree
        root = self._load(ROOT_INO)
        if root is None:
            raise CorruptMetadata("root directory inode 2 is not a directory")
        tree.add_node(root)
        queue = [ROOT_INO]
        total = max(self.geo.inodes_count - self._free_inodes(), 1)
        added = {ROOT_INO}  # (the tree is empty but for what this loop adds: the same answer as `in tree.nodes`)
        load = self._load_fast if self.fast_index else self._load
        while queue:
            d = queue.pop()
            for name, ino in self._entries(d)[0].items():
                if ino not in added:
                    node = load(ino)
                    if node is None:
                        continue
                    added.add(ino)
                    tree.add_node(node)  # (in bulk: only `in` answers for it until the end)
                    if node.type == "dir":
                        queue.append(ino)
                    if progress is not None and len(added) % 1000 == 0:
                        progress(len(added), total)
                tree.add_name(d, name, ino)
        if progress is not None:
            progress(len(tree.nodes), len(tree.nodes))

    def _free_inodes(self) -> int:
        try:
            raw = self._read_view(1024, 1024)
            return int.from_bytes(raw[16:20], "little")
        except Exception:  # noqa: BLE001 - only a progress estimate
            return 0

    def _load(self, ino: int) -> Node | None:
        """A full Node for a live inode at index time, registered in the block maps."""
        inode = self.reader.inode(ino)
        if inode.links == 0 or inode.mode == 0:
            return None
        node = self._load_detached(inode, shared_ok=True)
        node.name_ctime_ns = inode.ctime_ns
        self._own(node)
        return node

    fast_index = True  # _index takes _load_fast (tests turn it off to compare with the general path)
    bulk_index = True  # index() takes inference/ext/bulkindex.py first (with fast_index; tests turn it off)
    # ... for a file system of at least this many inodes in use (superblock count): below, importing numpy
    # (0.05-0.15 s, ~10 MiB) costs more than the per-inode path (~10 us per inode) takes
    bulk_min_inodes = 8192
    bulk_listings = True  # bulkindex parses the blocks of plain directories in bulk too (tests turn it off)

    def _load_fast(self, ino: int) -> Node | None:
        """_load for the common inode of an index, in one function: a file or directory with its extents in
        i_block (depth 0), no xattrs, no xattr block, a full-size record. Anything else (and anything this
        path's checks refuse, so errors are the general path's own) goes to _load. Same Node, same block maps:
        tests/unit/test_index_fast.py compares both paths on every test image."""
        geo, reader = self.geo, self.reader
        isz = geo.inode_size
        if isz <= 128 or not 1 <= ino <= geo.inodes_count:
            return self._load(ino)
        group, index = divmod(ino - 1, geo.inodes_per_group)  # (reader.inode_raw, inlined for its bulk window)
        descs, w = reader.descs, reader._window
        if group >= len(descs):
            return self._load(ino)
        pos = descs[group].inode_table * geo.block_size + index * isz
        if w is not None and w[0] <= pos and pos + isz <= w[0] + len(w[1]):
            raw = w[1][pos - w[0]:pos - w[0] + isz]
        else:
            raw = reader.inode_raw(ino)
            if len(raw) != isz:
                return self._load(ino)
        (mode, uid, size_lo, atime, ctime, mtime, _dtime, gid, links, blocks_lo, flags, _v, i_block, gen, acl_lo,
         size_hi, _f, blocks_hi, acl_hi, uid_hi, gid_hi, csum_lo, _r, extra, csum_hi, ctime_x, mtime_x, atime_x,
         _crtime, _crtime_x, _vh, _projid) = _unpack_large(raw)
        kind = _FAST_TYPES.get(mode & 0xF000)
        if (kind is None or not links or extra < 32 or extra & 3 or 128 + extra > isz
                or flags & (L.EXTENTS_FL | L.INLINE_DATA_FL) != L.EXTENTS_FL or acl_lo or (acl_hi and geo.is_64bit)
                or size_hi >> 31 or raw[128 + extra:132 + extra] == _XATTR_MAGIC_BYTES):
            return self._load(ino)
        magic, entries, emax, depth, _eg = _ext_header(i_block)
        if magic != L.EXT4_EXT_MAGIC or depth or emax > 4 or entries > emax:
            return self._load(ino)
        # (R.inode_csum_ok with i_checksum_hi, which extra >= 32 holds; a mismatch: _load raises the error)
        if reader.verify and geo.metadata_csum and csum_lo | csum_hi << 16 != _crc32c(
                ino.to_bytes(4, "little") + raw[0x64:0x68] + raw[:_CLO] + b"\0\0" + raw[_CLO + 2:_CHI] + b"\0\0"
                + raw[_CHI + 2:], geo.csum_seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF:
            return self._load(ino)
        extents = _leaf_entries(i_block, entries, geo) if entries else ()
        if extents is None:
            return self._load(ino)
        blocks = blocks_lo | (blocks_hi << 32 if geo.huge_file else 0)
        if flags & L.HUGE_FILE_FL and geo.huge_file:
            blocks *= geo.block_size // 512
        # (R.parse_inode's time decoding)
        a_ns = ((atime ^ SIGN32) - SIGN32 + ((atime_x & 3) << 32)) * NS + (atime_x >> 2)
        c_ns = ((ctime ^ SIGN32) - SIGN32 + ((ctime_x & 3) << 32)) * NS + (ctime_x >> 2)
        m_ns = ((mtime ^ SIGN32) - SIGN32 + ((mtime_x & 3) << 32)) * NS + (mtime_x >> 2)
        sig = zlib.crc32(raw[128:], zlib.crc32(i_block))  # (_sig, with file_acl 0)
        sig = zlib.crc32((c_ns & _U64).to_bytes(8, "little"), zlib.crc32(_ZERO8, sig))
        node = Node(ino, kind, mode, uid | uid_hi << 16, gid | gid_hi << 16, size_lo | size_hi << 32, m_ns, c_ns,
                    links, 0, a_ns, blocks, flags, None, None, extents, (), 0, gen, c_ns, False, sig)
        if extents:
            self.blocks.set_extents(ino, (), extents)
        return node

    def _own(self, node: Node, old: Node | None = None) -> None:
        if old is None or old.extents != node.extents:  # (an unchanged map of 10^5 extents costs nothing again)
            self.blocks.set_extents(node.ino, old.extents if old else (), node.extents)
        if old is not None:
            for b in old.meta_blocks:
                if self.meta_owner.get(b) == node.ino:
                    del self.meta_owner[b]
            if old.xattr_block:
                self.xattr_owners.get(old.xattr_block, set()).discard(node.ino)
        for b in node.meta_blocks:
            self.meta_owner[b] = node.ino
        if node.xattr_block:
            self.xattr_owners.setdefault(node.xattr_block, set()).add(node.ino)

    def _disown(self, node: Node) -> None:
        self.blocks.set_extents(node.ino, node.extents, ())
        for b in node.meta_blocks:
            if self.meta_owner.get(b) == node.ino:
                del self.meta_owner[b]
        if node.xattr_block:
            owners = self.xattr_owners.get(node.xattr_block, set())
            owners.discard(node.ino)
            if not owners:
                self.xattr_owners.pop(node.xattr_block, None)

    def _entries(self, d: int) -> tuple[dict[bytes, int], int | None]:
        """A directory's entries, and its '..' (None if it has none). The one way names enter the shadow tree
        (index and every re-read): entries the name policy refuses are left out and reported (`_note_bad`)."""
        inode = self._inode(d)  # (read_dir lists only inodes 1..inodes_count: it refuses the rest)
        listing = [(e.ino, e.name) for e in R.read_dir(inode, self.geo, self.reader.read_block)]
        out, parent, bad = N.split_entries(listing)
        if bad or self._bad_seen:
            self._note_bad(d, bad)
        return out, parent

    def _note_bad(self, d: int, bad: list[tuple[bytes, int, str]]) -> None:
        """Remember a directory's refused entries; the ones not reported yet while listed wait for `_bad_events`."""
        if self._bad_seen is None:
            self._bad_seen, self._bad_new = {}, []
        seen = self._bad_seen
        before = seen.pop(d, frozenset())
        if not bad:
            return
        now = frozenset((name, ino) for name, ino, _ in bad[:MAX_BAD_REMEMBERED])
        seen[d] = now
        reported = set(before)
        for name, ino, why in bad:
            if (name, ino) in reported:
                continue
            reported.add((name, ino))
            if len(self._bad_new) < MAX_ERRORS_PER_POINT:
                self._bad_new.append((d, name, ino, why))
            else:
                self._bad_more += 1
        total = sum(map(len, seen.values()))
        while total > MAX_BAD_REMEMBERED and len(seen) > 1:
            total -= len(seen.pop(next(iter(seen))))

    def _bad_events(self, ctx: Context) -> list[Mutation]:
        """One error event per refused entry found since the last report, naming its directory (path, inode),
        the entry's inode and the raw name in hex. The path is the tree's now, so call after applying names."""
        if not self._bad_new and not self._bad_more:
            return []
        events = []
        for d, name, ino, why in self._bad_new or ():
            path = self.tree.path(d)
            msg = (f"bad name left out: directory inode {d}, entry inode {ino}, "
                   f"name (hex) '{name.hex()}': {why}")
            log.warning("%s: %s %s", self.name, N.escape_name(path) if path is not None else "?", msg)
            self.stats.errors += 1
            events.append(ErrorEvent(seq=ctx.seq, time=ctx.time, kind=Kind.ERROR, path=fs_path(path or b"?"),
                                   fs=ctx.fs, vm=ctx.vm, ino=d, message=msg,
                                   extra={"dir_ino": d, "entry_ino": ino, "name_hex": name.hex()}))
        if self._bad_more:
            events.append(self._error(f"{self._bad_more} more bad names left out at this point", ctx))
        self._bad_new, self._bad_more = [], 0
        return events

    def refused_names(self, seq: int, time_ns: int) -> list[Mutation]:
        """Error events for the entries refused since the last report (those found by `index`, which has no
        consistency point of its own to report them at), stamped with the caller's seq and time."""
        return self._bad_events(Context(seq=seq, time=time_ns / 1e9, fs=self.name, vm=self.vm))

    def _forget_bad(self, d: int) -> None:
        """A directory freed or reused: its refused entries are reported again if they come back."""
        if self._bad_seen:
            self._bad_seen.pop(d, None)

    # -- writes

    def on_write(self, offset: int, length: int, seq: int, time_ns: int) -> list[Mutation]:
        """A write of [offset, offset+length) (fs-relative) is now in the replica."""
        self.stats.writes += 1
        bs = self.geo.block_size
        first, end = offset // bs, -(-(offset + length) // bs)
        events: list[Mutation] = []  # what fell due before this record was decided first (Engine._advance)
        jblocks = self._classify(first, end, offset, length, home=True, time_ns=time_ns)
        self.last_seq, self.last_ns, self._quiet_done, self._settled_done = seq, time_ns, False, False
        if self.pending_data and self.data_since is None:
            self.data_since = time_ns
        if self.preimage_bytes >= MAX_PREIMAGE:
            events += self.evaluate(seq, time_ns)  # no room to keep the last point's bytes: this is a point
        if not jblocks or self.journal is None:
            return events
        for tx in self.journal.on_write(jblocks):
            if isinstance(tx, JournalGap):
                self.stats.gaps += 1
                log.info("%s: journal gap at tid %d; reconciling from home locations", self.name, tx.tid)
                continue
            self.stats.transactions += 1
            for b in tx.revoked:
                self.overlay.pop(b, None)
            for b, data in tx.blocks.items():
                if 0 <= b < self.geo.blocks_count and len(data) == bs:
                    self.overlay[b] = data
                    self._classify(b, b + 1, b * bs, bs, home=False, time_ns=time_ns)
            events += self.evaluate(seq, time_ns)
        return events

    def _classify(self, first: int, end: int, offset: int, length: int, *, home: bool, time_ns: int) -> list[int]:
        """Mark what a write of blocks [first, end) dirties; return the journal blocks among them."""
        jblocks: list[int] = []
        count = end - first
        for start, n, logical in self.jmap:
            lo, hi = max(first, start), min(end, start + n)
            if lo < hi:
                jblocks.extend(range(logical + lo - start, logical + hi - start))
        checkpointed: set[int] = set()
        if home and self.overlay:
            bs = self.geo.block_size
            for b in range(first, end) if count < len(self.overlay) else \
                    [b for b in self.overlay if first <= b < end]:
                kept = self.overlay.pop(b, None)
                if kept is not None and self._read_home(b * bs, bs) == kept:
                    checkpointed.add(b)  # a commit's own bytes reaching home (data=journal): not a change
        dirty = self.dirty
        if first <= self.sb_block < end:
            pass  # counters and state flags; a resize would need a re-index
        # (each test walks the smaller side: a write of any length allocates nothing per block)
        if any(b in self.gdt for b in range(first, end)) if count < len(self.gdt) else \
                any(first <= b < end for b in self.gdt):
            dirty.gdt = True
            self.stats.metadata_blocks += 1
        i = max(bisect_right(self._itable_starts, first) - 1, 0)
        while i < len(self.itables) and self.itables[i][0] < end:
            t0, t1, _ = self.itables[i]
            lo, hi = max(first, t0), min(end, t1)
            if lo < hi:
                dirty.itable.update(range(lo, hi))
                self.stats.metadata_blocks += hi - lo
            i += 1
        owners = self.meta_owner
        if count <= len(owners):
            dirty.inodes.update(ino for b in range(first, end) if (ino := owners.get(b)) is not None)
        else:
            dirty.inodes.update(ino for b, ino in owners.items() if first <= b < end)
        if self.xattr_owners:
            xowners = self.xattr_owners
            for inos in ((xowners.get(b) for b in range(first, end)) if count <= len(xowners) else
                         (inos for b, inos in xowners.items() if first <= b < end)):
                if inos:
                    dirty.inodes.update(inos)
        bs = self.geo.block_size
        owned = 0
        for phys, n, ino, logical in self.blocks.owners(first, count):
            owned += n
            node = self.tree.nodes.get(ino)
            if node is None:
                continue
            if node.type == "dir":
                dirty.dirs.add(ino)
                continue
            if self.scope is not None and not self.in_scope(ino):
                self.stats.skipped_data += 1
                continue
            for p0, pn in _runs_without(phys, n, checkpointed) if checkpointed else ((phys, n),):
                lo = max(offset, p0 * bs) - phys * bs + logical * bs
                hi = min(offset + length, (p0 + pn) * bs) - phys * bs + logical * bs
                self.pending_data.setdefault(ino, []).append((lo, hi))
        self.stats.unowned_blocks += max(count - owned - len(jblocks), 0) if home else 0
        return jblocks

    # -- consistency points

    def tick(self, now_ns: int) -> list[Mutation]:
        """What waits for quiet becomes events once the file system has been quiet long enough: home-location
        changes (ext2's only truth, at once; for ext3/4 a checkpoint or a reconciliation, SETTLE_NS), data with
        no commit after it (DATA_WAIT_NS with a journal). Writeback comes in bursts, in any order, and is
        consistent only once a burst is over. Held sizes whose bound is up are released (reconcile.HOLD_S).
        `now_ns` is record time: Engine._advance calls this at each deadline, before the record past it or, on an
        idle log, when the live clock passes it, so a live run and a replay decide alike."""
        events: list[Mutation] = []
        # With a journal every change of metadata is a commit, a point at once (on_write). Data with no commit
        # after it waits DATA_WAIT_NS for one, and checkpoints a burst (SETTLE_NS): a file rewritten in place
        # is shown as one version, its bytes, size and mtime together.
        journal = self.journal is not None
        # No journal: 0, per record: ext2 names wait for their inodes in Reconciler, half-written blocks in broken
        if now_ns - self.last_ns >= (SETTLE_NS if journal else 0) and not self._quiet_done:
            self._quiet_done = True
            if self.dirty or self.retry_dirs or self.broken or self._map_notes or \
                    (self.pending_data and not journal):
                events += self.evaluate(self.last_seq, self.last_ns)
        if journal and self.data_since is not None and now_ns - self.data_since >= DATA_WAIT_NS:
            events += self.evaluate(self.last_seq, self.last_ns)
        if now_ns / 1e9 >= self.reconciler.hold_deadline:  # a held size's bound is up
            events += self.evaluate(self.last_seq, now_ns)
        if self._settle_waits() and now_ns - self.last_ns >= SETTLE_NS:
            self._settled_done = True  # once per quiet spell: only a new record can change what it decides
            events += self.evaluate(self.last_seq, self.last_ns, settled=True)
        return events

    def _settle_waits(self) -> bool:
        return (not getattr(self, "_settled_done", False) and
                bool(self.reconciler.stale or self.reconciler.reread or (self.pending_data and self.journal is None)))

    def deadline_ns(self) -> float:
        """The record time at which a tick would decide something, if no record comes before (inf: none)."""
        due = math.inf
        journal = self.journal is not None
        if not self._quiet_done:
            due = self.last_ns + (SETTLE_NS if journal else 0)  # no journal: per record (tick)
        if journal and self.data_since is not None:
            due = min(due, self.data_since + DATA_WAIT_NS)
        if self._settle_waits():
            due = min(due, self.last_ns + SETTLE_NS)
        if self.reconciler.hold_deadline < math.inf:  # in ns, and a ms late: float seconds compare safely then
            due = min(due, math.ceil(self.reconciler.hold_deadline * 1e9) + HOLD_SLACK_NS)
        return due

    def finish(self, seq: int, time_ns: int) -> list[Mutation]:
        """End of a replay or a detach: what is dirty, waiting or pending becomes events now."""
        self.reconciler.deadline_passed = True
        return self.evaluate(seq, time_ns)

    def evaluate(self, seq: int, time_ns: int, settled: bool = False) -> list[Mutation]:
        """Re-read everything dirty and reconcile it with the shadow tree. Directories told to wait are read
        again at once while that brings events: what they waited for may have come in this same point (the
        rename of a directory whose '..' already names its new parent)."""
        events = self._point(seq, time_ns, settled)
        progress = any(not e.is_error for e in events)
        for _ in range(MAX_RETRY_ROUNDS):
            if not (progress and self.retry_dirs):
                break
            more = self._point(seq, time_ns, settled)
            progress = any(not e.is_error for e in more)
            events += more
        return events

    def _point(self, seq: int, time_ns: int, settled: bool) -> list[Mutation]:
        self._parsed, self._parsed_at = {}, []
        try:
            events = self._point_body(seq, time_ns, settled)
            self._remember_parsed()
            return events
        finally:
            self._parsed = self._parsed_at = None

    def _remember_parsed(self) -> None:
        """The inodes _changed_inodes parsed as changed now match their tree nodes, mostly (a held size does not):
        where they do, the memo says so, so the checkpoint that writes the same bytes home parses none of them."""
        memo, nodes = self._itable_memo, self.tree.nodes
        for block, k, ino, fields in self._parsed_at or ():
            entry, node = memo.get(block), nodes.get(ino)
            if entry is not None and node is not None and fields == _CMP_FIELDS(node):
                entry[1][k] = fields

    def _inode(self, ino: int) -> R.Inode:
        """reader.inode(ino), without reading or parsing again a record _changed_inodes parsed at this point."""
        inode = self._parsed.get(ino) if self._parsed else None
        if inode is None:
            return self.reader.inode(ino)
        self.reader.check(inode.raw, ino)
        return inode

    def _point_body(self, seq: int, time_ns: int, settled: bool) -> list[Mutation]:
        ctx = Context(seq=seq, time=time_ns / 1e9, fs=self.name, vm=self.vm)
        errors: list[str] = []
        dirty, self.dirty = self.dirty, _Dirty()
        if dirty.gdt:
            try:
                gdt = b"".join(self.reader.read_block(b) for b in R.gdt_blocks(self.geo))
                self.reader.descs = R.parse_group_descs(gdt, self.geo)
            except CorruptMetadata as exc:
                errors.append(str(exc))
        change = Change()
        dirty.now = time_ns / 1e9
        fresh: set[int] = set(dirty.inodes)  # inodes whose record or map changed (the rest: retries of broken ones)
        for b in sorted(dirty.itable):
            fresh |= self._changed_inodes(b, change, errors)
        reload = fresh | {k for k in self.broken if k > 0}
        self._shared_now: dict[int, tuple[int, int]] = {}
        waiting = self._shared_wait or {}
        for ino in sorted(reload):
            if ino in waiting and ino not in fresh and self._holds(*waiting[ino], change):
                self._shared_now[ino] = waiting[ino]  # unchanged, still refused: not read again until it changes
                continue
            self._reload(ino, change, dirty, errors)
        self._settle_shared(change, dirty, errors)
        # A freed directory, or one whose number now holds something else, is empty, whatever its old blocks say.
        freed_dirs = {ino for ino, node in change.inodes.items() if ino in self.tree.children
                      and (node is None or node.type != "dir" or change.generations.get(ino))}
        todo = dirty.dirs | self.retry_dirs | freed_dirs
        attempted: set[int] = set()
        for _ in range(MAX_DIR_ROUNDS):  # a new directory found below brings its own entries to read
            for d in sorted(todo):
                if self._read_dir_into(d, change, dirty, errors):
                    attempted.add(d)  # (an inode not known yet may become known below: then it is read)
            # Inodes whose names change but whose records this point did not re-read (ext2 writes them back
            # in any order): read them now, so a reused inode number shows its new generation.
            for d in todo:
                if d not in change.dirs:
                    continue  # unreadable: its names stay as they were
                entries, old = change.dirs[d], self.tree.children.get(d, {})
                for ino in {i for n, i in entries.items() if old.get(n) != i} | {
                        i for n, i in old.items() if entries.get(n) != i}:
                    if ino not in change.inodes and self._differs(ino):
                        self._reload(ino, change, dirty, errors)
            todo = (dirty.dirs | {d for d in todo if d in change.inodes}) - attempted
            if not todo:
                break
        self._settle_shared(change, dirty, errors)
        if self._map_notes:
            errors += self._map_notes
            self._map_notes = None
        change.data, self.pending_data = self.pending_data, {}
        self._clear_preimage()
        if self.scope is not None:  # data not attributed: its sizes cannot wait for it
            change.unheld = {ino for ino in change.inodes.keys() | change.data.keys() if not self.in_scope(ino)}
        if self.journal is None and not settled and not self.reconciler.deadline_passed:
            # Without a journal a data block may come before the record that says whose it is now (a deleted
            # file's block reused by a new one): it counts once its inode's record came in this burst too, or
            # once the burst is over.
            seen = change.inodes.keys() | self.reconciler.reread
            self.pending_data = {ino: r for ino, r in change.data.items() if ino not in seen}
            change.data = {ino: r for ino, r in change.data.items() if ino in seen}
        before = {ino: self.tree.nodes.get(ino) for ino in change.inodes}
        broken_dirs = self.retry_dirs
        events, self.retry_dirs = self.reconciler.apply(change, ctx, settled)
        if self._scope_cache and (change.dirs or any(node is None for node in change.inodes.values())):
            self._scope_cache = None      # names may have changed: judge the scope again
        self.retry_dirs |= {d for d in broken_dirs if -d in self.broken}
        events += self._bad_events(ctx)
        for ino, node in change.inodes.items():
            if node is None or change.generations.get(ino):
                self._forget_bad(ino)
            # An inode that left the tree, or was freed: its blocks leave the maps at once (they are reused quickly).
            if node is None or ino not in self.tree.nodes:
                for gone in (node, before[ino]):
                    if gone is not None:
                        self._disown(gone)
        for msg in errors[:MAX_ERRORS_PER_POINT]:
            events.append(self._error(msg, ctx))
        if len(errors) > MAX_ERRORS_PER_POINT:
            events.append(self._error(f"{len(errors) - MAX_ERRORS_PER_POINT} more errors at this point", ctx))
        return events

    def _holds(self, block: int, owner: int, change: Change) -> bool:
        """Does `owner`'s map still hold mapping block `block` (not freed at this point)?"""
        return self.meta_owner.get(block) == owner and not (owner in change.inodes and change.inodes[owner] is None)

    def _settle_shared(self, change: Change, dirty: _Dirty, errors: list[str]) -> None:
        """Maps _reload refused as shared: read again if the other inode let go of the block in this point (re-read
        after it); else wait like a half-written inode, and past the deadline track it without its data."""
        shared, self._shared_now = self._shared_now, {}
        for ino, (block, owner) in sorted(shared.items()):
            if not self._holds(block, owner, change):
                self._reload(ino, change, dirty, errors)
                if ino not in self._shared_now:
                    continue
            if self._still_broken(ino, dirty):
                self._reload(ino, change, dirty, errors, shared_ok=True)
        self._shared_now = {}

    def _changed_inodes(self, block: int, change: Change, errors: list[str]) -> set[int]:
        """Inodes of one inode-table block whose cheap signature differs from the tree's.

        An inode whose bytes are those it had when it last matched its tree node, and whose node still has the
        fields it matched (the memo), matches again without parsing: the answer is a function of the two.
        The changed ones are kept parsed for the rest of the point (`_inode`), where reader.inode would read the
        same bytes: while the group's descriptor still names the table the block belongs to."""
        geo = self.geo
        i = bisect_right(self._itable_starts, block) - 1
        t0, _, group = self.itables[i]
        isz = geo.inode_size
        per_block = geo.block_size // isz
        ino0 = group * geo.inodes_per_group + (block - t0) * per_block + 1
        raw = self._read_view(block * geo.block_size, geo.block_size)
        if self._itable_memo is None:
            self._itable_memo = {}
        memo = self._itable_memo.pop(block, None)  # (put back last: the least recently compared go first)
        if memo is not None:
            self._memo_bytes -= len(memo[0])
            was_raw, was = memo
            same = was_raw == raw
        descs = self.reader.descs
        parsed = self._parsed if self._parsed is not None and group < len(descs) and \
            descs[group].inode_table == t0 else None
        kept: list[tuple | None] = [None] * per_block
        nodes, zero = self.tree.nodes, bytes(isz)
        resident, get = nodes.resident.get, nodes.get
        # (hot: ~16 slots per dirty block, most of them as they were) the slots' records sliced at once, the valid
        # slots worked out once per block, the bytes compared before the tree's node is looked at
        offs = range(0, per_block * isz, isz)
        recs = [raw[a:a + isz] for a in offs]
        olds = None if memo is None or same else [was_raw[a:a + isz] for a in offs]
        if ino0 >= geo.first_ino and ino0 + per_block - 1 <= geo.inodes_count:
            slots: range | list[int] = range(per_block)
        else:
            slots = [k for k in range(per_block) if ino0 + k <= geo.inodes_count and
                     (ino0 + k >= geo.first_ino or ino0 + k == ROOT_INO)]
        out: set[int] = set()
        for k in slots:
            ino = ino0 + k
            old = resident(ino) or get(ino)
            rec = recs[k]
            if memo is not None and old is not None and (fields := was[k]) is not None and \
                    (same or rec == olds[k]) and fields == _CMP_FIELDS(old):
                kept[k] = fields
                continue
            if old is None and rec == zero:  # (memcmp: any() walked it byte by byte)
                continue
            try:
                inode = R.parse_inode(rec, ino, geo)
            except CorruptMetadata as exc:
                errors.append(str(exc))
                continue
            if inode.links == 0 or inode.mode == 0:
                if old is not None:
                    change.inodes[ino] = None
                continue
            fields = (inode.mode, inode.uid, inode.gid, min(inode.size, R.MAX_SIZE), inode.mtime_ns, inode.links,
                      inode.generation, inode.atime_ns, inode.blocks, inode.flags, _sig(inode))  # (_CMP_FIELDS)
            if old is None or fields != _CMP_FIELDS(old):
                out.add(ino)
                if parsed is not None:
                    parsed[ino] = inode
                    self._parsed_at.append((block, k, ino, fields))
            else:
                kept[k] = fields
        self._itable_memo[block] = (raw, kept)
        self._memo_bytes += len(raw)
        while self._memo_bytes > ITABLE_MEMO_BYTES:
            self._memo_bytes -= len(self._itable_memo.pop(next(iter(self._itable_memo)))[0])
        return out

    def _read_dir_into(self, d: int, change: Change, dirty: _Dirty, errors: list[str]) -> bool:
        """Read a directory's entries into the change; False if its inode is not known (yet) at this point."""
        node = change.inodes.get(d, self.tree.nodes.get(d))
        if node is None or node.type != "dir":
            if d in self.tree.children:
                change.dirs[d] = {}
            return node is not None or d in self.tree.children
        try:
            change.dirs[d], parent = self._entries(d)
            if parent is not None:
                change.parents[d] = parent
            self.broken.pop(-d, None)
        except CorruptMetadata as exc:
            if self._still_broken(-d, dirty):  # (negative: a directory's blocks, not its inode)
                errors.append(f"directory inode {d}: {exc}")
            else:
                self.retry_dirs.add(d)
        return True

    def _still_broken(self, key: int, dirty: _Dirty) -> bool:
        """Unreadable metadata may be half-written (ext2 writes an inode before its blocks): look again at the
        next point, and report it only once it stays broken past the deadline (or at the end)."""
        first = self.broken.setdefault(key, dirty.now)
        if self.reconciler.deadline_passed or dirty.now - first > self.reconciler.MAX_WAIT:
            del self.broken[key]
            return True
        return False

    def _differs(self, ino: int) -> bool:
        """Does the inode's record differ from the tree's node (or is it new)?"""
        old = self.tree.nodes.get(ino)
        try:
            inode = self._inode(ino)
        except CorruptMetadata:
            return True
        if old is None:
            return inode.links > 0 and inode.mode != 0
        return inode.links == 0 or inode.mode == 0 or inode.generation != old.gen or _sig(inode) != old.sig

    def _reload(self, ino: int, change: Change, dirty: _Dirty, errors: list[str], shared_ok: bool = False) -> None:
        old = self.tree.nodes.get(ino)
        if self._shared_wait:
            self._shared_wait.pop(ino, None)
        try:
            inode = self._inode(ino)
            if inode.links == 0 or inode.mode == 0:
                if old is not None:
                    change.inodes[ino] = None
                return
            try:
                node = self._load_detached(inode, change, shared_ok=shared_ok)
            except R.SharedMapBlock as exc:
                # Another live inode's map holds one of its mapping blocks: a hostile tree shared between inodes,
                # or a block freed by an inode whose record comes later (in this point, or later: ext2 writes
                # back in any order). _point decides once this point's inodes are read.
                self._shared_now[ino] = (exc.block, exc.owner)
                if self._shared_wait is None:
                    self._shared_wait = {}
                self._shared_wait[ino] = (exc.block, exc.owner)
                return
        except CorruptMetadata as exc:
            # Half-written (ext2 writes an inode before its indirect blocks) or garbage: look again at the
            # next consistency point, and report it only if it stays broken past the deadline.
            if self._still_broken(ino, dirty):
                errors.append(f"inode {ino}: {exc}")
            return
        self.broken.pop(ino, None)
        change.inodes[ino] = node
        reborn = old is not None and old.gen != node.gen
        change.generations[ino] = reborn
        if node.type == "dir" and (old is None or reborn or old.extents != node.extents or old.size != node.size):
            dirty.dirs.add(ino)
        self._own(node, old)
        if node.type == "file" and self.in_scope(ino):
            fresh = old is None or reborn  # a new file: all its initialized blocks are newly mapped
            new = _new_blocks((), node.extents) if fresh else _new_blocks(old.extents, node.extents)
            if new:
                change.data.setdefault(ino, []).extend(self._mapped_data(node, new))
        if change.data.get(ino):
            self.pending_data.setdefault(ino, []).extend(change.data.pop(ino))

    def _mapped_data(self, node: Node, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The file's bytes that newly mapped initialized blocks hold (reconcile.Reconciler._hold_sizes counts them
        as written): data=ordered writes a new block's data before the commit that maps it, so its bytes are real
        up to the size committed with it, and in the block holding the end of the file up to its last nonzero
        byte, which may lie past that size: ext4 sets the size after it submits the block, so a write() in
        between is in the size and not in the block (seen: 460 bytes; those bytes need a data write of their
        own), while bytes the block holds past the size were written with it (writeback zeroes a page past
        i_size; seen: `>` then `dd` at offset 11 of one file, the block's rest committed with the smaller size)
        and count once a later size covers them."""
        bs, size = self.geo.block_size, node.size
        eof = size // bs if size % bs else None  # the block holding the file's last byte, if it is partial
        out: list[tuple[int, int]] = []
        for lo, hi in blocks:
            a, b = lo * bs, min(hi * bs, size)
            if eof is not None and lo <= eof < hi:
                phys = next((p + eof - lg for lg, p, n, un in node.extents if lg <= eof < lg + n and not un), None)
                if phys is not None:
                    block = self.read_view(phys * bs, bs)  # data=journal: in the overlay
                    b = eof * bs + data_end(block)  # (len of rstrip(b"\0"), by memcmp: inference/zeros.py)
            if a < b:
                out.append((a, b))
        return out

    def _load_detached(self, inode: R.Inode, change: Change | None = None, *, shared_ok: bool = False) -> Node:
        """An inode's Node (mapping, xattrs, link target), without touching the block maps.

        Hostile numbers are bounded here. A map past the reader's caps (R.MAX_EXTENTS extents, R.MAX_MAP_BLOCKS
        mapping blocks), or that would bring the file system's block map past MAX_FS_EXTENTS ranges (many distinct
        large trees), is tracked without data attribution: no extents (writes to its data give no modify
        ranges), only the mapping blocks read before the cap (writes to them still re-read it); an error says so.
        A mapping block that another live inode's map holds (`change`: the point's freed inodes let go of theirs)
        raises SharedMapBlock, or with `shared_ok` gives the same unattributed node and error: a shared subtree
        is read once, by its first owner, never expanded again per inode. An i_size past 2^63-1 (negative to the
        guest's kernel) is clamped to it, with an error."""
        geo, rb = self.geo, self.reader.read_block
        leaf = _leaf_extents(inode, geo)
        try:
            if leaf is not None:  # (the common map: no claim, no cap can apply to it)
                extents, meta = leaf, ()
            else:
                extents, meta = R.file_map(inode, geo, rb, claim=self._claim(inode.ino, change))
                extents = tuple((e.logical, e.physical, e.length, e.uninit) for e in extents)
            if len(extents) > 64 and len(self.blocks) + len(extents) - len(
                    getattr(self.tree.nodes.get(inode.ino), "extents", ())) > MAX_FS_EXTENTS:
                raise R.MapTooBig(f"inode {inode.ino}: {len(extents)} extents would pass the file system's "
                                  f"{MAX_FS_EXTENTS}", meta)
        except R.MapTooBig as exc:
            extents, meta = (), exc.meta
            self._note(f"{exc}: its data is not attributed")
        except R.SharedMapBlock as exc:
            if not shared_ok:
                raise
            extents, meta = (), ()
            self._note(f"{exc}: its data is not attributed")
        size = inode.size
        if size > R.MAX_SIZE:
            self._note(f"inode {inode.ino}: i_size {size} is past 2^63-1: clamped to {R.MAX_SIZE}")
            size = R.MAX_SIZE
        # (positional, in Node's field order: name_ctime_ns 0, entries_changed False, no names)
        node = Node(inode.ino, inode.type, inode.mode, inode.uid, inode.gid, size, inode.mtime_ns, inode.ctime_ns,
                    inode.links, inode.rdev, inode.atime_ns, inode.blocks, inode.flags, None, None, extents,
                    tuple(meta), inode.file_acl, inode.generation, 0, False, _sig(inode))
        node.xattrs = {k: bytes(v) for k, v in R.inode_xattrs(inode, geo, rb).items()} or None
        if inode.type == "symlink":
            node.target = R.symlink_target(inode, geo, rb)
        return node

    _map_notes: list[str] | None = None  # errors found while loading inodes, reported at the next point
    _shared_wait: dict[int, tuple[int, int]] | None = None  # inode -> (block, owner) that refused its map

    def _note(self, message: str) -> None:
        if self._map_notes is None:
            self._map_notes = []
        if len(self._map_notes) < MAX_ERRORS_PER_POINT:  # (what _point reports at most)
            self._map_notes.append(message)
        elif len(self._map_notes) == MAX_ERRORS_PER_POINT:
            self._map_notes.append("more inodes with too large or shared maps, or huge sizes (not listed)")

    def _claim(self, ino: int, change: Change | None) -> Callable[[int], None]:
        """file_map's claim for inode `ino`: refuse a mapping block that another live inode's map holds."""
        owners, nodes = self.meta_owner, self.tree.nodes

        def claim(block: int) -> None:
            owner = owners.get(block)
            if owner is None or owner == ino or owner not in nodes:
                return
            if change is not None and owner in change.inodes and change.inodes[owner] is None:
                return  # freed at this point: its blocks leave the maps once the point is applied
            raise R.SharedMapBlock(f"inode {ino}: mapping block {block} is also in the map of inode {owner}",
                                   block, owner)
        return claim

    def _error(self, message: str, ctx: Context | None = None) -> Mutation:
        self.stats.errors += 1
        log.warning("%s: %s", self.name, message)
        ctx = ctx or Context(seq=0, time=0.0, fs=self.name, vm=self.vm)
        return ErrorEvent(seq=ctx.seq, time=ctx.time, kind=Kind.ERROR, path="/", fs=ctx.fs, vm=ctx.vm, message=message)


def _sig(inode: R.Inode) -> int:
    """Cheap fingerprint of what the tuple compare in _changed_inodes misses: block-map root, xattrs in the inode,
    the xattr block, ctime (which moves with every xattr or link change). The ctime's low 64 bits: a signed
    64-bit count of ns ends in 2262, ext4's epoch bits reach 2446 (the same bytes as signed below 2262)."""
    return zlib.crc32(inode.i_block + inode.raw[128:] + inode.file_acl.to_bytes(8, "little")
                      + (inode.ctime_ns & _U64).to_bytes(8, "little"))


def _leaf_extents(inode: R.Inode, geo: R.Geometry) -> tuple | None:
    """R.file_map's extents, as a node keeps them, for the common map: a file's or directory's extent tree all in
    i_block (depth 0, no mapping block). None for anything else, and for anything file_map would refuse: it then
    decides, with its own errors. (Skips file_map's closure and an Extent per extent: ~1/10 of a _reload.)"""
    if inode.flags & (L.EXTENTS_FL | L.INLINE_DATA_FL) != L.EXTENTS_FL or inode.type not in _FAST_KINDS:
        return None
    i_block = inode.i_block
    magic, entries, emax, depth, _eg = _ext_header(i_block)
    if magic != L.EXT4_EXT_MAGIC or depth or emax > 4 or entries > emax:
        return None
    return _leaf_entries(i_block, entries, geo)


def _leaf_entries(i_block: bytes, entries: int, geo: R.Geometry) -> tuple | None:
    """The `entries` leaf extents in i_block as a node keeps them; None if one is empty, out of order, or outside
    the file system (the general path then decides, with its errors)."""
    out, end, first, count = [], 0, geo.first_data_block, geo.blocks_count
    for logical, length, hi, lo in _ext_leaves(i_block[12:12 + 12 * entries]):
        uninit = length > L.EXT_INIT_MAX_LEN
        length -= L.EXT_INIT_MAX_LEN if uninit else 0
        phys = lo | hi << 32
        if not length or logical < end or logical + length > 1 << 32 or phys < first or phys + length > count:
            return None
        end = logical + length
        out.append((logical, phys, length, uninit))
    return tuple(out)


_FAST_KINDS = ("file", "dir")


def _new_blocks(old: tuple, new: tuple) -> list[tuple[int, int]]:
    """Logical block ranges that the new mapping maps (initialized) to different physical blocks than the old.

    One merge of the two maps sorted by logical block (each has disjoint ranges): linear in their sizes. (Comparing
    every new extent with every old one cost 470 s for one change of a 115,600-extent file.)"""
    if old == new:
        return []
    old_map: list[tuple[int, int, int]] = sorted((lg, ph, n) for lg, ph, n, un in old if not un)
    out: list[tuple[int, int]] = []
    j, count = 0, len(old_map)
    for lg, ph, n, un in sorted(new):
        if un:
            continue
        pos, end = lg, lg + n
        while j < count and old_map[j][0] + old_map[j][2] <= pos:
            j += 1
        k = j
        while k < count and old_map[k][0] < end:
            olg, oph, on = old_map[k]
            k += 1
            if olg + on <= pos:
                continue
            if olg > pos:
                out.append((pos, olg))
            same_lo, same_hi = max(pos, olg), min(end, olg + on)
            if oph - olg != ph - lg:
                out.append((same_lo, same_hi))
            pos = same_hi
        if pos < end:
            out.append((pos, end))
    return out


def _runs_without(start: int, n: int, skip: set[int]) -> list[tuple[int, int]]:
    """The runs of blocks [start, start+n) that are not in `skip`, as (first, count)."""
    runs: list[tuple[int, int]] = []
    b, end = start, start + n
    while b < end:
        a = b
        while b < end and b not in skip:
            b += 1
        if b > a:
            runs.append((a, b - a))
        b += 1
    return runs

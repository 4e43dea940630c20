"""The pre-index in bulk: whole inode tables parsed at once as numpy columns, the shadow tree written as arrays.

The general crawl (ExtHandler._index) spends Python bytecode on every inode: read, check, parse, a Node, the
stage's buffers, the block map. Here the inode tables are read up to 16 MiB at a time and viewed through a
numpy dtype derived from the construct declaration (layout.numpy_dtype(layout.inode_large)); column arithmetic
picks the common records (what ExtHandler._load_fast takes: a file or directory with at most 4 extents in
i_block, depth 0, no xattrs, no xattr block, a full-size record, times that fit a signed 64-bit count of ns)
and computes their fields, extents and signature together. What is left per record is one crc32c call (its
metadata_csum, on rows numpy builds) and one CRC-32 call (zlib-ng's; the handler's signature, `_sig`).

The crawl then walks directories only: an inode the tables did not take (anything unusual: inline data, block
maps of ext2/3, deeper extent trees, xattrs, devices, symlinks, a bad checksum, an inode only a directory says is
in use) is loaded by ExtHandler._load, so its errors, notes and shared-block checks are that path's own. The
tree's columns (shadow._Base, as shadow._Stage.freeze writes them) and the block map are written from the columns.

The result equals the general path's (tests/unit/test_index_bulk.py compares the pickled handlers on every test
image). Where equality would need the general path's order of block-map edits (ranges of two inodes that
overlap: hostile), the handler's state is put back and the general path indexes the file system instead.
"""

from __future__ import annotations

import copy
from array import array
from collections.abc import Callable
from itertools import compress, filterfalse, repeat

import numpy as np
from zlib_ng import zlib_ng

from inference.blockmap import BlockMap
from inference.errors import CorruptMetadata
from inference.ext import layout as L
from inference.ext import reader as R
from inference.shadow import _CHILD, _FIXED, _NAME, ROOT_INO, Node, _Base

BATCH_BYTES = 16 << 20   # inode-table bytes parsed per numpy batch (a few groups): bounds the scan's memory
LIST_BATCH_BYTES = 4 << 20  # directory blocks parsed per batch (their entries' arrays take ~8x that at most)
MAX_NS_SECONDS = 9_000_000_000  # past this a time in ns leaves int64: such an inode goes to the general path
_I64 = np.int64
_SIGN32 = 1 << 31
_TC = {"B": "u1", "H": "<u2", "I": "<u4", "Q": "<u8", "b": "i1", "h": "<i2", "i": "<i4", "q": "<i8"}
# the handler state a bulk attempt may change before it gives up (put back as it was)
_STATE = ("blocks", "meta_owner", "xattr_owners", "_map_notes", "_shared_wait", "_bad_seen", "_bad_new",
          "_bad_more", "stats")


class _Redo(Exception):
    """The bulk result could differ from the general path's: index by the general path instead."""


class Table:
    """The common in-use inodes of a file system, sorted by inode number: their Node fields as columns, their
    extents flattened (the extents of row i are flat[ext_at[i]:ext_at[i] + ext_n[i]])."""

    def __init__(self, parts: list[dict[str, np.ndarray]]) -> None:
        keys = ("ino", "is_dir", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "links", "atime_ns",
                "blocks", "flags", "gen", "sig", "ext_n")
        self.cols = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, _I64) for k in keys}
        self.flat = [np.concatenate([p["flat"][i] for p in parts]) if parts else np.zeros(0, _I64)
                     for i in range(4)]
        n = self.cols["ext_n"].astype(_I64)
        self.ext_at = np.cumsum(n) - n
        self.ino = self.cols["ino"]

    def __len__(self) -> int:
        return len(self.ino)


def scan(h) -> Table:  # noqa: ANN001 - an ExtHandler (not imported: it imports this module)
    """The Table of `h`'s file system: every group's used inode records (the part of the table before
    bg_itable_unused when the descriptors are checksummed, the inodes its bitmap marks used) parsed in batches.
    Never raises on what the disk holds: a record it cannot take is left to the general path."""
    geo, reader = h.geo, h.reader
    isz, bs, ipg = geo.inode_size, geo.block_size, geo.inodes_per_group
    if isz < 160:  # (no room for a 32-byte i_extra_isize: every inode is the general path's)
        return Table([])
    dt = L.numpy_dtype(L.inode_large, isz)
    lazy = geo.metadata_csum or geo.feature_ro_compat & L.RO_COMPAT_GDT_CSUM
    read = reader._read
    parts: list[dict[str, np.ndarray]] = []
    recs: list[np.ndarray] = []
    inos: list[np.ndarray] = []
    held = 0
    step = max(1, BATCH_BYTES // isz)  # records read at once: a hostile geometry's group is not read whole
    for g, d in enumerate(reader.descs):
        first = g * ipg + 1
        if first > geo.inodes_count:
            break
        n = min(ipg - (d.itable_unused if lazy else 0), geo.inodes_count - first + 1)
        if n <= 0:
            continue
        bitmap = read(d.inode_bitmap * bs, bs)
        if len(bitmap) != bs:
            continue
        used = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")[:n].astype(bool)
        for at in range(0, n, step):
            m = min(step, n - at)
            raw = read(d.inode_table * bs + at * isz, m * isz)
            if len(raw) != m * isz:
                break
            table = np.frombuffer(raw, np.uint8).reshape(m, isz)
            mode = table[:, 0].astype(bool) | table[:, 1].astype(bool)  # (a record with mode 0 is not taken)
            keep = np.flatnonzero(used[at:at + m] & mode)
            if not len(keep):
                continue
            recs.append(table if len(keep) == m else table[keep])  # (a full table: no copy here)
            inos.append(keep.astype(_I64) + first + at)
            held += len(keep) * isz
            if held >= BATCH_BYTES:
                parts.append(_parse(_joined(recs), np.concatenate(inos), dt, h))
                recs, inos, held = [], [], 0
    if recs:
        parts.append(_parse(_joined(recs), np.concatenate(inos), dt, h))
    return Table([p for p in parts if len(p["ino"])])


def _joined(recs: list[np.ndarray]) -> np.ndarray:
    return recs[0] if len(recs) == 1 else np.concatenate(recs)


def _crcs(crc: Callable, rows: np.ndarray, *seed: int) -> np.ndarray:
    """crc(row, *seed) of every row of a C-contiguous 2-D uint8 array, as int64: one call per row (no copy)."""
    k, w = rows.shape
    if not k:
        return np.zeros(0, _I64)
    mv = memoryview(rows).cast("B")
    return np.array(list(map(crc, map(mv.__getitem__, map(slice, range(0, k * w, w), range(w, k * w + w, w))),
                             *(repeat(x, k) for x in seed))), _I64).reshape(k)


def _signed_ns(sec: np.ndarray, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R.parse_inode's time decoding (signed seconds + epoch bits, then ns) in int64; and where it would not fit."""
    s = (sec.astype(_I64) ^ _SIGN32) - _SIGN32 + ((extra.astype(_I64) & 3) << 32)
    return s * 1_000_000_000 + (extra.astype(_I64) >> 2), s > MAX_NS_SECONDS


def _parse(rec: np.ndarray, ino: np.ndarray, dt: np.dtype, h) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The columns of the records _load_fast would take, out of `rec` (k records of the inode size) of inodes
    `ino`: the same checks, as column arithmetic."""
    geo = h.geo
    isz = geo.inode_size
    a = rec.view(dt).reshape(-1)
    k = len(a)
    mode = a["i_mode"].astype(_I64)
    kind = mode & 0xF000
    extra = a["i_extra_isize"].astype(_I64)
    flags = a["i_flags"].astype(_I64)
    ok = ((kind == 0x8000) | (kind == 0x4000)) & (a["i_links_count"] != 0) & (extra >= 32) & (extra & 3 == 0)
    ok &= (128 + extra <= isz) & (flags & (L.EXTENTS_FL | L.INLINE_DATA_FL) == L.EXTENTS_FL)
    ok &= a["i_file_acl_lo"] == 0
    if geo.is_64bit:
        ok &= a["l_i_file_acl_high"] == 0
    ok &= a["i_size_high"] < 1 << 31
    at = np.minimum(128 + extra, isz - 4)  # in-inode xattrs: their magic right after i_extra_isize
    rows = np.arange(k)
    magic = (rec[rows, at].astype(_I64) | rec[rows, at + 1].astype(_I64) << 8 | rec[rows, at + 2].astype(_I64) << 16
             | rec[rows, at + 3].astype(_I64) << 24)
    ok &= ~((magic == L.XATTR_MAGIC) & (128 + extra + 4 <= isz))
    ext_dt = np.dtype([("h", L.numpy_dtype(L.extent_header)), ("e", L.numpy_dtype(L.extent_leaf), (4,))])
    e = np.ascontiguousarray(a["i_block"]).view(ext_dt).reshape(-1)
    entries = e["h"]["eh_entries"].astype(_I64)
    emax = e["h"]["eh_max"].astype(_I64)
    ok &= (e["h"]["eh_magic"] == L.EXT4_EXT_MAGIC) & (e["h"]["eh_depth"] == 0) & (emax <= 4) & (entries <= emax)
    lg = e["e"]["ee_block"].astype(_I64)
    ln = e["e"]["ee_len"].astype(_I64)
    ph = e["e"]["ee_start_lo"].astype(_I64) | e["e"]["ee_start_hi"].astype(_I64) << 32
    un = ln > L.EXT_INIT_MAX_LEN
    ln = np.where(un, ln - L.EXT_INIT_MAX_LEN, ln)
    slot = np.arange(4)[None, :] < entries[:, None]
    end = np.zeros(k, _I64)
    for j in range(4):
        act = slot[:, j]
        ok &= ~(act & ((ln[:, j] == 0) | (lg[:, j] < end) | (lg[:, j] + ln[:, j] > 1 << 32)
                       | (ph[:, j] < geo.first_data_block) | (ph[:, j] + ln[:, j] > geo.blocks_count)))
        end = np.where(act, lg[:, j] + ln[:, j], end)
    a_ns, a_big = _signed_ns(a["i_atime"], a["i_atime_extra"])
    c_ns, c_big = _signed_ns(a["i_ctime"], a["i_ctime_extra"])
    m_ns, m_big = _signed_ns(a["i_mtime"], a["i_mtime_extra"])
    ok &= ~(a_big | c_big | m_big)
    if h.reader.verify and geo.metadata_csum:
        ok &= _csum_ok(rec, ino, a, ok, geo)
    idx = np.flatnonzero(ok)
    blocks = a["i_blocks_lo"].astype(_I64)
    if geo.huge_file:
        blocks |= a["l_i_blocks_high"].astype(_I64) << 32
        blocks *= np.where(flags & L.HUGE_FILE_FL, geo.block_size // 512, 1)
    # the handler's _sig: crc32 of i_block, the record past byte 128, the 8-byte xattr block (0), the ctime
    w = 60 + isz - 128 + 16
    sig_rows = np.zeros((len(idx), w), np.uint8)
    sig_rows[:, :60] = rec[idx, 40:100]
    sig_rows[:, 60:60 + isz - 128] = rec[idx, 128:]
    sig_rows[:, w - 8:] = c_ns[idx].astype("<i8").view(np.uint8).reshape(-1, 8)
    sig = _crcs(zlib_ng.crc32, sig_rows)  # (zlib's CRC-32, 1/3 faster per call here)
    slot = slot[idx]
    return _compact({
        "ino": ino[idx], "is_dir": kind[idx] == 0x4000, "mode": mode[idx],
        "uid": (a["i_uid"].astype(_I64) | a["l_i_uid_high"].astype(_I64) << 16)[idx],
        "gid": (a["i_gid"].astype(_I64) | a["l_i_gid_high"].astype(_I64) << 16)[idx],
        "size": (a["i_size_lo"].astype(_I64) | a["i_size_high"].astype(_I64) << 32)[idx],
        "mtime_ns": m_ns[idx], "ctime_ns": c_ns[idx], "links": a["i_links_count"].astype(_I64)[idx],
        "atime_ns": a_ns[idx], "blocks": blocks[idx], "flags": flags[idx],
        "gen": a["i_generation"].astype(_I64)[idx], "sig": sig, "ext_n": entries[idx],
        "flat": [lg[idx][slot], ph[idx][slot], ln[idx][slot], un[idx][slot].astype(_I64)],
    })


# what each column fits (on-disk widths): the table of a file system of millions of inodes is ~80 B per inode
_NARROW = {"ino": np.uint32, "mode": np.uint16, "uid": np.uint32, "gid": np.uint32, "links": np.uint16,
           "flags": np.uint32, "gen": np.uint32, "sig": np.uint32, "ext_n": np.uint8}


def _compact(part: dict) -> dict:
    for k, t in _NARROW.items():
        part[k] = part[k].astype(t)
    part["flat"][3] = part["flat"][3].astype(np.uint8)
    return part


def _csum_ok(rec: np.ndarray, ino: np.ndarray, a: np.ndarray, ok: np.ndarray, geo: R.Geometry) -> np.ndarray:
    """R.inode_csum_ok of each record still `ok` (with i_checksum_hi: i_extra_isize >= 32 holds it): the seed
    (inode number, generation) and the record with its checksum fields zeroed, one crc32c call per record."""
    out = np.zeros(len(rec), bool)
    idx = np.flatnonzero(ok)
    isz = geo.inode_size
    w = 8 + isz
    rows = np.empty((len(idx), w), np.uint8)
    rows[:, :4] = ino[idx].astype("<u4").view(np.uint8).reshape(-1, 4)
    rows[:, 4:8] = rec[idx, 0x64:0x68]
    rows[:, 8:] = rec if len(idx) == len(rec) else rec[idx]
    lo, hi = 8 + L.INODE_CSUM_LO_OFFSET, 8 + L.INODE_CSUM_HI_OFFSET
    rows[:, lo:lo + 2] = 0
    rows[:, hi:hi + 2] = 0
    got = _crcs(R.crc32c.crc32c, rows, geo.csum_seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    stored = a["l_i_checksum_lo"][idx].astype(_I64) | a["i_checksum_hi"][idx].astype(_I64) << 16
    out[idx] = got == stored
    return out


class _CountingMap(BlockMap):
    """The block map during the crawl: the general path's, for the inodes the crawl loads itself (ExtHandler._load
    registers them), and counting the ranges of table inodes added so far (registered at the end), so `len` is
    what the general path's map would hold at that moment (_load_detached's MAX_FS_EXTENTS check reads it)."""

    def __init__(self, order: list[int], table: Table) -> None:
        super().__init__()
        self._order, self._table, self._done, self._pending = order, table, 0, 0

    def __len__(self) -> int:
        new = np.array(self._order[self._done:], _I64)
        self._done = len(self._order)
        if len(new) and len(self._table):
            pos = np.minimum(np.searchsorted(self._table.ino, new), len(self._table) - 1)
            hit = self._table.ino[pos] == new
            self._pending += int(self._table.cols["ext_n"][pos[hit]].sum())
        return len(self._starts) + self._pending


def index(h, progress: Callable[[int, int], None] | None = None) -> bool:  # noqa: ANN001
    """Build `h`'s shadow tree and block map as ExtHandler._index does (h's tree empty). False: the bulk result
    could differ (overlapping ranges); h is as it was, the caller indexes by the general path."""
    saved = {k: copy.deepcopy(h.__dict__[k]) for k in _STATE if k in h.__dict__}
    table = scan(h)
    order: list[int] = []
    h.blocks = _CountingMap(order, table)
    try:
        base, blocks = _crawl(h, table, order, progress)
    except _Redo:
        for k in _STATE:  # (in place: the pickled handler lists its attributes in the order they were made)
            if k in saved:
                h.__dict__[k] = saved[k]
            else:
                h.__dict__.pop(k, None)
        return False
    except BaseException:
        h.blocks = BlockMap()
        raise
    h.tree._adopt(base)
    h.blocks = blocks
    return True


def listings(h, table: Table) -> dict[int, dict[bytes, int]]:  # noqa: ANN001
    """ExtHandler._entries of the table's plain directories (no htree index), where a directory is the common case:
    its blocks read whole, checksums right, every entry well formed, '.' and '..' first and no name the policy
    refuses. Entries of all blocks of a batch of directories are parsed together, one entry of every block per
    numpy step. A directory left out is read by _entries in the crawl (which raises or reports what it finds)."""
    geo = h.geo
    bs = geo.block_size
    c = table.cols
    dirs = np.flatnonzero(c["is_dir"] & (c["flags"] & L.INDEX_FL == 0))
    if not len(dirs):
        return {}
    # each directory's blocks, as read_dir reads them: initialized extents, up to its size, at most MAX_DIR_BLOCKS
    n = table.cols["ext_n"][dirs].astype(_I64)
    first = table.ext_at[dirs]
    owner = np.repeat(dirs, n)
    at = np.repeat(first - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    lg, ph, ln, un = (f[at] for f in table.flat)
    nblocks = -(-c["size"][owner] // bs)
    count = np.where(un == 1, 0, np.maximum(0, np.minimum(ln, nblocks - lg)))
    total = np.zeros(len(table), _I64)
    np.add.at(total, owner, count)
    fine = (total <= R.MAX_DIR_BLOCKS) & (total * bs <= LIST_BATCH_BYTES)  # (a larger one: read block by block)
    keep = fine[owner] & (count > 0)
    out: dict[int, dict[bytes, int]] = {}
    owner, ph, count = owner[keep], ph[keep], count[keep]
    start = 0
    while start < len(owner):  # batches of whole directories, at most 2 LIST_BATCH_BYTES of blocks each
        stop = start + 1
        held = int(count[start])
        while stop < len(owner) and (owner[stop] == owner[stop - 1] or held * bs < LIST_BATCH_BYTES):
            held += int(count[stop])
            stop += 1
        _listing_batch(h, table, owner[start:stop], ph[start:stop], count[start:stop], out)
        start = stop
    return out


_TAIL = b"\0\0\0\0\x0c\0\0" + bytes([L.DIR_TAIL_FT])


def _listing_batch(h, table: Table, owner: np.ndarray, ph: np.ndarray, count: np.ndarray,  # noqa: ANN001
                   out: dict[int, dict[bytes, int]]) -> None:
    geo, read = h.geo, h.reader._read
    bs = geo.block_size
    raw = b"".join(read(int(p) * bs, int(k) * bs) for p, k in zip(ph.tolist(), count.tolist(), strict=True))
    blk_owner = np.repeat(owner, count)         # table row of each block's directory
    nb = len(blk_owner)
    if len(raw) != nb * bs:
        return
    bad = np.zeros(len(table), bool)
    if geo.metadata_csum:  # read_dir's leaf check (whatever reader.verify says): a dirent tail must match
        ino, gen = table.ino, table.cols["gen"]
        seeds: dict[int, int] = {}
        crc = R.crc32c_raw
        for b, row in enumerate(blk_owner.tolist()):
            blk = raw[b * bs:(b + 1) * bs]
            if blk[-12:-4] == _TAIL:
                seed = seeds.get(row)
                if seed is None:
                    seed = seeds[row] = crc(geo.csum_seed, int(ino[row]).to_bytes(4, "little")
                                            + int(gen[row]).to_bytes(4, "little"))
                if crc(seed, blk[:-12]) != int.from_bytes(blk[-4:], "little"):
                    bad[row] = True
    flat = np.frombuffer(raw, np.uint8)
    words = np.frombuffer(raw, "<u4").astype(_I64)  # (entries start 4-aligned: rec_len is a multiple of 4)
    # R.parse_dir_block for every block at once: one entry per block per step
    off = np.zeros(nb, _I64)
    active = np.ones(nb, bool)
    got_b, got_off, got_ino, got_len = [], [], [], []
    icount, wpb = geo.inodes_count, bs // 4
    while True:
        ab = np.flatnonzero(active)
        if not len(ab):
            break
        o = off[ab]
        cross = o + 8 > bs
        base = ab * wpb + np.minimum(o, bs - 8) // 4
        e_ino = words[base]
        second = words[base + 1]
        rec_len = second & 0xFFFF
        name_len = (second >> 16) & 0xFF if geo.filetype else second >> 16
        if bs == 65536:
            rec_len = np.where((rec_len == 0) | (rec_len == 65535), 65536, rec_len)
        wrong = cross | (rec_len < 12) | (rec_len & 3 != 0) | (rec_len < ((8 + name_len + 3) & ~3)) | (o + rec_len > bs)
        live = ~wrong & (e_ino != 0)
        wrong |= live & (e_ino > icount)
        live &= ~wrong
        bad[blk_owner[ab[wrong]]] = True
        got_b.append(ab[live])
        got_off.append(o[live])
        got_ino.append(e_ino[live])
        got_len.append(name_len[live])
        off[ab] = o + rec_len
        active[ab] = ~wrong & (o + rec_len < bs)
    e_b, e_off, e_ino, e_len = (np.concatenate(x) for x in (got_b, got_off, got_ino, got_len))
    by = np.argsort(e_b * bs + e_off, kind="stable")  # on-disk order: block by block, then by offset
    e_b, e_off, e_ino, e_len = e_b[by], e_off[by], e_ino[by], e_len[by]
    e_row = blk_owner[e_b]
    # the names, and what names.split_entries checks of them: '.' and '..' first, no other '.', '..', '' or / NUL
    at = e_b * bs + e_off + 8
    cum = np.cumsum(e_len) - e_len
    chars = flat[np.repeat(at - cum, e_len) + np.arange(int(e_len.sum()))]
    blob = chars.tobytes()
    ends = (cum + e_len).tolist()
    names = list(map(blob.__getitem__, map(slice, cum.tolist(), ends)))
    refused = np.concatenate([[0], np.cumsum((chars == 0x2F) | (chars == 0))])
    has_bad = refused[cum + e_len] - refused[cum] > 0
    first = chars[np.minimum(cum, max(len(chars) - 1, 0))] if len(chars) else np.zeros(len(e_len), np.uint8)
    second = chars[np.minimum(cum + 1, max(len(chars) - 1, 0))] if len(chars) else first
    dot = (e_len == 1) & (first == 0x2E)
    dotdot = (e_len == 2) & (first == 0x2E) & (second == 0x2E)
    row_start = np.searchsorted(e_row, e_row, "left")  # (entries are grouped by directory: rows ascend)
    pos = np.arange(len(e_row)) - row_start
    wrong = np.where(pos == 0, ~dot, np.where(pos == 1, ~dotdot, (e_len == 0) | dot | dotdot | has_bad))
    bad[e_row[wrong]] = True
    rows, starts, counts = np.unique(e_row, return_index=True, return_counts=True)
    ino_list, table_ino = e_ino.tolist(), table.ino
    for row, a, k in zip(rows.tolist(), starts.tolist(), counts.tolist(), strict=True):
        if k >= 2 and not bad[row]:
            out[int(table_ino[row])] = dict(zip(names[a + 2:a + k], ino_list[a + 2:a + k], strict=True))


def _crawl(h, table: Table, order: list[int], progress: Callable[[int, int], None] | None  # noqa: ANN001
           ) -> tuple[_Base, BlockMap]:
    tree = h.tree
    fast = dict(zip(table.ino.tolist(), table.cols["is_dir"].tolist(), strict=True))
    added = {ROOT_INO}
    slow: list[tuple[int, Node]] = []
    parents: list[int] = []
    counts: list[int] = []
    names: list[bytes] = []
    inos: list[int] = []
    total = max(h.geo.inodes_count - h._free_inodes(), 1)
    with tree.bulk():
        tree._stage.inos = added  # (what `ino in tree.nodes` answers while loading: _claim asks it)
        root = h._load(ROOT_INO)
        if root is None:
            raise CorruptMetadata("root directory inode 2 is not a directory")
        slow.append((0, root))
        order.append(ROOT_INO)
        queue = [ROOT_INO]
        load, entries_of, get = h._load, h._entries, fast.get
        listed = listings(h, table) if h.bulk_listings else {}
        while queue:
            d = queue.pop()
            entries = listed.pop(d, None)
            if entries is None:
                entries = entries_of(d)[0]
            if not entries:
                continue
            parents.append(d)
            counts.append(len(entries))
            names.extend(entries)
            inos.extend(entries.values())
            fresh = list(filterfalse(added.__contains__, dict.fromkeys(entries.values())))
            kinds = list(map(get, fresh))
            if None not in kinds:  # (all from the table: the whole directory at once, by calls that loop in C)
                order.extend(fresh)
                added.update(fresh)
                queue.extend(compress(fresh, kinds))
                if progress is not None and len(added) // 1000 > (len(added) - len(fresh)) // 1000:
                    progress(len(added), total)
                continue
            for ino in fresh:
                if ino in added:
                    continue
                is_dir = get(ino)
                if is_dir is None:
                    node = load(ino)
                    if node is None:
                        continue
                    slow.append((len(order), node))
                    is_dir = node.type == "dir"
                added.add(ino)
                order.append(ino)
                if is_dir:
                    queue.append(ino)
                if progress is not None and len(added) % 1000 == 0:
                    progress(len(added), total)
        tree._stage.inos = set()
    if progress is not None:
        progress(len(order), len(order))
    return _columns(table, order, slow, parents, counts, names, inos)


def _pack(col: np.ndarray) -> array:
    """shadow._pack of an int64 column: the narrowest array type that holds it, same type codes."""
    if not len(col):
        return array("B")
    lo, hi = int(col.min()), int(col.max())
    for tc in ("BHIQ" if lo >= 0 else "bhiq"):
        bits = array(tc).itemsize * 8
        if hi < 1 << bits if tc.isupper() else -(1 << bits - 1) <= lo and hi < 1 << bits - 1:
            return array(tc, col.astype(_TC[tc]).tobytes())
    raise AssertionError("an int64 column fits 'q'")


def _column(n: int, fast_at: np.ndarray, fast_vals: np.ndarray | None, slow: list[tuple[int, Node]],
            attr: str) -> array | list:
    """One Node field by row (node order): the table's values where it has the inode, the loaded nodes' elsewhere.
    A value past int64 (a hostile inode the general path loaded) makes the column what shadow._pack makes of a list."""
    from inference.shadow import _pack as pack_list

    col = np.zeros(n, _I64)
    if fast_vals is not None:
        col[fast_at[0]] = fast_vals[fast_at[1]]
    vals = [int(getattr(node, attr)) for _, node in slow]
    try:
        col[[p for p, _ in slow]] = vals
    except OverflowError:
        out = col.tolist()
        for (p, _), v in zip(slow, vals, strict=True):
            out[p] = v
        return pack_list(out)
    return _pack(col)


def _columns(table: Table, order: list[int], slow: list[tuple[int, Node]], parents: list[int], counts: list[int],
             names: list[bytes], inos: list[int]) -> tuple[_Base, BlockMap]:
    """shadow._Stage's flush and freeze for this crawl, in numpy; and the block map."""
    n = len(order)
    o = np.array(order, _I64)
    spos = np.array([p for p, _ in slow], _I64)
    is_fast = np.ones(n, bool)
    is_fast[spos] = False
    fidx = np.flatnonzero(is_fast)
    fpos = np.searchsorted(table.ino, o[fidx])
    if len(fidx) and not (table.ino[np.minimum(fpos, len(table) - 1)] == o[fidx]).all():
        raise AssertionError("an inode the crawl took from the table is not in it")
    at = (fidx, fpos)
    fixed_src = {"mode": "mode", "uid": "uid", "gid": "gid", "size": "size", "mtime_ns": "mtime_ns",
                 "ctime_ns": "ctime_ns", "links": "links", "atime_ns": "atime_ns", "blocks": "blocks",
                 "flags": "flags", "gen": "gen", "name_ctime_ns": "ctime_ns", "sig": "sig"}
    b = _Base()
    # types in the order they first come (shadow._Stage numbers them so)
    fdir = table.cols["is_dir"][fpos] if len(fidx) else np.zeros(0, bool)
    first: dict[str, int] = {}
    for name, mask in (("dir", fdir), ("file", ~fdir)):
        hit = np.flatnonzero(mask)
        if len(hit):
            first[name] = int(fidx[hit[0]])
    for p, node in slow:
        if p < first.get(node.type, n + 1):
            first[node.type] = p
    types = sorted(first, key=first.__getitem__)
    code = {t: i for i, t in enumerate(types)}
    tcol = np.zeros(n, _I64)
    tcol[fidx] = np.where(fdir, code.get("dir", 0), code.get("file", 0))
    tcol[spos] = [code[node.type] for _, node in slow]
    cols: list = [_pack(o), _pack(tcol)]
    for f in _FIXED:
        src = fixed_src.get(f)
        cols.append(_column(n, at, table.cols[src] if src else None, slow, f))
    # extents: the table's flat arrays, then the loaded nodes' extents, gathered in node order
    s_ext = [e for _, node in slow for e in node.extents]
    try:
        s_flat = [np.array([e[i] for e in s_ext], _I64) for i in range(4)]
    except OverflowError:
        raise _Redo from None
    ext_n = np.zeros(n, _I64)
    src_at = np.zeros(n, _I64)
    ext_n[fidx] = table.cols["ext_n"][fpos]
    src_at[fidx] = table.ext_at[fpos]
    s_n = np.array([len(node.extents) for _, node in slow], _I64)
    ext_n[spos] = s_n
    src_at[spos] = len(table.flat[0]) + np.cumsum(s_n) - s_n
    ext_at = np.cumsum(ext_n) - ext_n
    gather = np.repeat(src_at - ext_at, ext_n) + np.arange(int(ext_n.sum()))
    flat = [np.concatenate([table.flat[i], s_flat[i]])[gather] for i in range(4)]
    meta_n = np.zeros(n, _I64)
    meta_n[spos] = [len(node.meta_blocks) for _, node in slow]
    meta = [m for _, node in slow for m in node.meta_blocks]
    cols += [_pack(ext_at), _pack(ext_n), _pack(np.cumsum(meta_n) - meta_n), _pack(meta_n)]
    # name rows: (parent, inode, end of its name in the blob); each one an entry and a name of its inode, or only
    # an entry (an inode the crawl did not take)
    par = np.repeat(np.array(parents, _I64), np.array(counts, _I64))
    rino = np.array(inos, _I64)
    ends = np.cumsum(np.fromiter(map(len, names), _I64, len(names)))
    order_sorted = np.argsort(o, kind="stable")
    inos_sorted = o[order_sorted]
    in_tree = inos_sorted[np.minimum(np.searchsorted(inos_sorted, rino), n - 1)] == rino
    kind = np.where(in_tree, _CHILD | _NAME, _CHILD)
    b.inos, b.by_ino = _pack(inos_sorted), _pack(order_sorted)
    nm_rows = np.flatnonzero(kind & _NAME)
    nm = nm_rows[np.argsort(rino[nm_rows], kind="stable")]
    ch = np.argsort(par, kind="stable")
    keys = rino[nm]
    name_at, name_n = np.zeros(n, _I64), np.zeros(n, _I64)
    left = np.searchsorted(keys, inos_sorted, "left")
    name_at[order_sorted] = left
    name_n[order_sorted] = np.searchsorted(keys, inos_sorted, "right") - left
    b.cols = cols + [_pack(name_at), _pack(name_n)]
    b.types = tuple(types)
    b.ext = [_pack(x) for x in flat]
    from inference.shadow import _pack as pack_list
    b.meta = pack_list(meta)
    b.targets = {order[p]: node.target for p, node in slow if node.target is not None}
    b.xattrs = {order[p]: node.xattrs for p, node in slow if node.xattrs}
    b.rw_parent, b.rw_ino, b.rw_end, b.blob = _pack(par), _pack(rino), _pack(ends), b"".join(names)
    b.nm, b.ch = _pack(nm), _pack(ch)
    s_dirs = np.array([order[p] for p, node in slow if node.type == "dir"], _I64)
    dirs = np.unique(np.concatenate([o[fidx][fdir], s_dirs, np.array(parents, _I64)]))
    pkeys = par[ch]
    dir_at = np.searchsorted(pkeys, dirs, "left")
    b.dirs, b.dir_at, b.dir_n = _pack(dirs), _pack(dir_at), _pack(np.searchsorted(pkeys, dirs, "right") - dir_at)
    return b, _blockmap(o, ext_n, flat)


def _blockmap(o: np.ndarray, ext_n: np.ndarray, flat: list[np.ndarray]) -> BlockMap:
    """Every node's ranges, each owned by its inode: what registering them one node at a time gives when no two
    overlap (else _Redo: the general path's order of edits decides who keeps a block)."""
    lg, ph, ln, _un = flat
    owner = np.repeat(o, ext_n)
    keep = ln > 0
    lg, ph, ln, owner = lg[keep], ph[keep], ln[keep], owner[keep]
    by = np.argsort(ph, kind="stable")
    ph, ln, lg, owner = ph[by], ln[by], lg[by], owner[by]
    if len(ph) > 1 and (ph[1:] < ph[:-1] + ln[:-1]).any():
        raise _Redo
    m = BlockMap()
    m._starts = ph.tolist()
    m._info = dict(zip(m._starts, zip(ln.tolist(), owner.tolist(), lg.tolist(), strict=True), strict=True))
    return m

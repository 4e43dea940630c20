"""Sans-I/O ext2/3/4 reader: superblock, group descriptors, inodes, block maps, directories, xattrs, symlinks.

Everything works over bytes the caller supplies (`read(offset, length)` on the file system's byte space, or
`read_block(n)`), so the same code serves the base image, the replica and fuzz tests. Every byte comes from a
hostile guest: each loop, depth and allocation is bounded, and garbage raises CorruptMetadata naming the structure.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import crc32c

from inference.errors import CorruptMetadata
from inference.ext import layout as L

ROOT_INO = 2
MAX_EXTENT_DEPTH = 5
MAX_GROUPS = 1 << 24  # 2 PiB at 4 KiB blocks: more is implausible for a VM disk and would cost unbounded memory
MAX_WALK_DEPTH = 2048  # PATH_MAX is 4096 bytes: no real path is deeper
# Per-inode caps on a block map: every mapping costs time and memory linear in its size, and no more than these.
# A file of 2^17 extents (ext4 allocates up to 128 MiB per extent) or 2^12 mapping blocks (a 16 GiB indirect-mapped
# file at 4 KiB blocks) is far past any honest VM workload; beyond them the guest is hostile (or broken).
MAX_EXTENTS = 1 << 17
MAX_MAP_BLOCKS = 1 << 12
MAX_DIR_BLOCKS = 1 << 16  # a directory of 256 MiB at 4 KiB blocks (millions of entries)
MAX_SIZE = (1 << 63) - 1  # the kernel's loff_t: an i_size above it is negative to the guest's own kernel
TYPES = {0x1000: "fifo", 0x2000: "chardev", 0x4000: "dir", 0x6000: "blockdev", 0x8000: "file", 0xA000: "symlink",
         0xC000: "socket"}
XATTR_PREFIX = {1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.",
                6: "security.", 8: "system.richacl"}
INLINE_INDEX = 7  # "system.data": the tail of inline data; the kernel never lists it

ReadFn = Callable[[int, int], bytes]
ReadBlockFn = Callable[[int], bytes]


def crc32c_raw(seed: int, data: bytes) -> int:
    """The kernel's ext4_chksum (crc32c without the final inversion) on top of the standard crc32c package."""
    return crc32c.crc32c(data, seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


# ---------------------------------------------------------------- superblock and group descriptors

@dataclass(frozen=True, slots=True)
class Geometry:
    block_size: int
    blocks_count: int
    inodes_count: int
    inodes_per_group: int
    blocks_per_group: int
    first_data_block: int
    inode_size: int
    desc_size: int
    groups: int
    first_ino: int
    journal_inum: int
    uuid: bytes
    label: str
    is_64bit: bool
    has_journal: bool
    metadata_csum: bool
    extents: bool
    flex_bg: bool
    filetype: bool
    dir_index: bool
    huge_file: bool
    inline_data: bool
    journal_dev: bool
    csum_seed: int
    kind: str
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    rev_level: int
    log_groups_per_flex: int
    reserved_gdt_blocks: int
    meta_bg: bool
    first_meta_bg: int
    sparse_super: bool
    ea_inode: bool


def _corrupt_sb(why: str) -> CorruptMetadata:
    return CorruptMetadata(f"superblock: {why}")


def parse_superblock(raw1024: bytes) -> Geometry:
    """Geometry of a file system from the 1024 bytes at byte 1024, refusing impossible or unchecksummed values."""
    if len(raw1024) < 1024:
        raise _corrupt_sb(f"short ({len(raw1024)} bytes)")
    s = L.superblock.parse(raw1024)
    if s.s_magic != L.MAGIC:
        raise _corrupt_sb(f"bad magic 0x{s.s_magic:04x}")
    compat, incompat, ro = s.s_feature_compat, s.s_feature_incompat, s.s_feature_ro_compat
    metadata_csum = bool(ro & L.RO_COMPAT_METADATA_CSUM)
    if metadata_csum:
        if s.s_checksum_type != 1:
            raise _corrupt_sb(f"unknown checksum type {s.s_checksum_type}")
        want = crc32c_raw(0xFFFFFFFF, raw1024[: L.SB_CHECKSUM_OFFSET])
        if want != s.s_checksum:
            raise _corrupt_sb(f"checksum 0x{s.s_checksum:08x} != computed 0x{want:08x}")
    if s.s_log_block_size > 6:
        raise _corrupt_sb(f"block size 2^{10 + s.s_log_block_size} > 64 KiB")
    bs = 1024 << s.s_log_block_size
    is_64bit = bool(incompat & L.INCOMPAT_64BIT)
    blocks = s.s_blocks_count_lo | ((s.s_blocks_count_hi << 32) if is_64bit else 0)
    if not blocks or not s.s_inodes_count or not s.s_blocks_per_group or not s.s_inodes_per_group:
        raise _corrupt_sb("zero block/inode count or per-group count")
    if s.s_blocks_per_group > 8 * bs or s.s_inodes_per_group > 8 * bs:
        raise _corrupt_sb("more blocks or inodes per group than a bitmap block can hold")
    if s.s_first_data_block >= blocks or s.s_first_data_block > 1:
        raise _corrupt_sb(f"first data block {s.s_first_data_block}")
    if s.s_rev_level == 0:
        inode_size, first_ino = 128, 11
    else:
        inode_size, first_ino = s.s_inode_size, s.s_first_ino
        if inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1):
            raise _corrupt_sb(f"inode size {inode_size}")
        if first_ino < 11 or first_ino > s.s_inodes_count:
            raise _corrupt_sb(f"first inode {first_ino}")
    if is_64bit:
        desc_size = s.s_desc_size
        if desc_size < 64 or desc_size > 1024 or desc_size & (desc_size - 1):
            raise _corrupt_sb(f"descriptor size {desc_size}")
    else:
        desc_size = 32
    groups = -(-(blocks - s.s_first_data_block) // s.s_blocks_per_group)
    if groups > MAX_GROUPS:
        raise _corrupt_sb(f"{groups} groups")
    if s.s_inodes_count != groups * s.s_inodes_per_group:
        raise _corrupt_sb(f"inode count {s.s_inodes_count} != {groups} groups x {s.s_inodes_per_group}")
    if s.s_journal_inum > s.s_inodes_count:
        raise _corrupt_sb(f"journal inode {s.s_journal_inum}")
    seed = s.s_checksum_seed if incompat & L.INCOMPAT_CSUM_SEED else crc32c_raw(0xFFFFFFFF, s.s_uuid)
    has_journal, extents = bool(compat & L.COMPAT_HAS_JOURNAL), bool(incompat & L.INCOMPAT_EXTENTS)
    flex_bg = bool(incompat & L.INCOMPAT_FLEX_BG)
    kind = "ext2" if not has_journal else "ext3" if not (extents or is_64bit or flex_bg) else "ext4"
    return Geometry(
        block_size=bs, blocks_count=blocks, inodes_count=s.s_inodes_count, inodes_per_group=s.s_inodes_per_group,
        blocks_per_group=s.s_blocks_per_group, first_data_block=s.s_first_data_block, inode_size=inode_size,
        desc_size=desc_size, groups=groups, first_ino=first_ino, journal_inum=s.s_journal_inum, uuid=bytes(s.s_uuid),
        label=s.s_volume_name.split(b"\0", 1)[0].decode("utf-8", "replace"), is_64bit=is_64bit,
        has_journal=has_journal, metadata_csum=metadata_csum, extents=extents, flex_bg=flex_bg,
        filetype=bool(incompat & L.INCOMPAT_FILETYPE), dir_index=bool(compat & L.COMPAT_DIR_INDEX),
        huge_file=bool(ro & L.RO_COMPAT_HUGE_FILE), inline_data=bool(incompat & L.INCOMPAT_INLINE_DATA),
        journal_dev=bool(incompat & L.INCOMPAT_JOURNAL_DEV), csum_seed=seed, kind=kind, feature_compat=compat,
        feature_incompat=incompat, feature_ro_compat=ro, rev_level=s.s_rev_level,
        log_groups_per_flex=s.s_log_groups_per_flex, reserved_gdt_blocks=s.s_reserved_gdt_blocks,
        meta_bg=bool(incompat & L.INCOMPAT_META_BG), first_meta_bg=s.s_first_meta_bg,
        sparse_super=bool(ro & L.RO_COMPAT_SPARSE_SUPER), ea_inode=bool(incompat & L.INCOMPAT_EA_INODE),
    )


@dataclass(frozen=True, slots=True)
class GroupDesc:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    flags: int
    itable_unused: int
    free_blocks: int
    free_inodes: int
    used_dirs: int
    checksum: int


def group_has_super(group: int, geo: Geometry) -> bool:
    """Whether a group holds a superblock backup (sparse_super: groups 0, 1 and powers of 3, 5, 7)."""
    if group <= 1 or not geo.sparse_super:
        return True
    for base in (3, 5, 7):
        n = base
        while n < group:
            n *= base
        if n == group:
            return True
    return False


def gdt_blocks(geo: Geometry) -> list[int]:
    """File-system blocks holding the primary group descriptor table, in descriptor order (meta_bg aware)."""
    per_block = geo.block_size // geo.desc_size
    count = -(-geo.groups // per_block)
    first = geo.first_data_block + 1
    if not geo.meta_bg:
        return list(range(first, first + count))
    head = min(count, geo.first_meta_bg)
    out = list(range(first, first + head))
    for meta in range(head, count):
        group = meta * per_block
        out.append(geo.first_data_block + group * geo.blocks_per_group + group_has_super(group, geo))
    return out


def parse_group_descs(raw: bytes, geo: Geometry) -> list[GroupDesc]:
    """All group descriptors from the concatenated GDT blocks; every table must lie inside the file system."""
    size = geo.desc_size
    if len(raw) < geo.groups * size:
        raise CorruptMetadata(f"group descriptor table: {len(raw)} bytes for {geo.groups} groups")
    st = L.GROUP_DESC64_ST if geo.is_64bit else L.GROUP_DESC32_ST
    itable_blocks = -(-geo.inodes_per_group * geo.inode_size // geo.block_size)
    out = []
    for g in range(geo.groups):
        v = st.unpack_from(raw, g * size)
        bb, ib, it, fb, fi, ud, flags, unused, csum = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[10], v[11]
        if geo.is_64bit:
            bb, ib, it = bb | v[12] << 32, ib | v[13] << 32, it | v[14] << 32
            fb, fi, ud, unused = fb | v[15] << 16, fi | v[16] << 16, ud | v[17] << 16, unused | v[18] << 16
        if max(bb, ib) >= geo.blocks_count or it + itable_blocks > geo.blocks_count or not (bb and ib and it):
            raise CorruptMetadata(f"group descriptor {g}: bitmap or inode table outside the file system")
        if unused > geo.inodes_per_group:
            raise CorruptMetadata(f"group descriptor {g}: {unused} unused inodes of {geo.inodes_per_group}")
        out.append(GroupDesc(bb, ib, it, flags, unused, fb, fi, ud, csum))
    return out


# ---------------------------------------------------------------- inodes

@dataclass(slots=True)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    atime: float
    ctime: float
    mtime: float
    crtime: float
    atime_ns: int
    ctime_ns: int
    mtime_ns: int
    crtime_ns: int
    links: int
    flags: int
    generation: int
    file_acl: int
    dtime: int
    i_block: bytes
    extra_isize: int
    type: str
    rdev: int
    blocks: int  # in 512-byte units, like st_blocks
    projid: int
    raw: bytes  # the on-disk inode, for checksums and in-inode xattrs


def inode_location(ino: int, geo: Geometry, descs: list[GroupDesc]) -> tuple[int, int]:
    """(file-system block, byte offset in it) of an inode's on-disk record."""
    if not 1 <= ino <= geo.inodes_count:
        raise CorruptMetadata(f"inode {ino}: out of range 1..{geo.inodes_count}")
    group, index = divmod(ino - 1, geo.inodes_per_group)
    if group >= len(descs):
        raise CorruptMetadata(f"inode {ino}: group {group} has no descriptor")
    block, offset = divmod(index * geo.inode_size, geo.block_size)
    return descs[group].inode_table + block, offset


def _rdev(i_block: bytes) -> int:
    """Device number of a device inode as Linux dev_t (old 16-bit encoding in i_block[0], new in i_block[1])."""
    old, new = struct.unpack_from("<II", i_block)
    if old:
        major, minor = (old >> 8) & 0xFF, old & 0xFF
    else:
        major, minor = (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)
    return ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & ~0xFF) << 12) | ((major & ~0xFFF) << 32)


_unpack_base, _unpack_large = L.INODE_BASE_ST.unpack_from, L.INODE_LARGE_ST.unpack_from
SIGN32, NS = 1 << 31, 1_000_000_000


def parse_inode(raw: bytes, ino: int, geo: Geometry) -> Inode:
    """One on-disk inode (geo.inode_size bytes) via the derived struct format: the hot path of table scans."""
    isz = geo.inode_size
    if len(raw) < isz:
        raise CorruptMetadata(f"inode {ino}: {len(raw)} bytes, inode size is {isz}")
    if isz > 128:
        (mode, uid, size_lo, atime, ctime, mtime, dtime, gid, links, blocks_lo, flags, _v, i_block, gen, acl_lo,
         size_hi, _f, blocks_hi, acl_hi, uid_hi, gid_hi, _c, _r, extra, _ch, ctime_x, mtime_x, atime_x, crtime,
         crtime_x, _vh, projid) = _unpack_large(raw)
        if 128 + extra > isz or extra & 3:
            raise CorruptMetadata(f"inode {ino}: i_extra_isize {extra} with inode size {isz}")
        if extra < 32:
            projid = 0
            if extra < 24:
                crtime = crtime_x = 0 if extra < 20 else crtime
                if extra < 16:
                    atime_x = 0
                    if extra < 12:
                        mtime_x = 0
                        if extra < 8:
                            ctime_x = 0
    else:
        (mode, uid, size_lo, atime, ctime, mtime, dtime, gid, links, blocks_lo, flags, _v, i_block, gen, acl_lo,
         size_hi, _f, blocks_hi, acl_hi, uid_hi, gid_hi, _c, _r) = _unpack_base(raw)
        extra = ctime_x = mtime_x = atime_x = crtime = crtime_x = projid = 0
    kind = TYPES.get(mode & 0xF000, "unknown")
    blocks = blocks_lo | (blocks_hi << 32 if geo.huge_file else 0)
    if flags & L.HUGE_FILE_FL and geo.huge_file:
        blocks *= geo.block_size // 512
    # ext4_decode_extra_time, inlined (4 calls were half the cost): signed seconds + epoch bits, then ns
    a_ns = ((atime ^ SIGN32) - SIGN32 + ((atime_x & 3) << 32)) * NS + (atime_x >> 2)
    c_ns = ((ctime ^ SIGN32) - SIGN32 + ((ctime_x & 3) << 32)) * NS + (ctime_x >> 2)
    m_ns = ((mtime ^ SIGN32) - SIGN32 + ((mtime_x & 3) << 32)) * NS + (mtime_x >> 2)
    cr_ns = ((crtime ^ SIGN32) - SIGN32 + ((crtime_x & 3) << 32)) * NS + (crtime_x >> 2)
    acl = acl_lo | (acl_hi << 32 if geo.is_64bit else 0)
    return Inode(ino, mode, uid | uid_hi << 16, gid | gid_hi << 16, size_lo | size_hi << 32, a_ns / 1e9, c_ns / 1e9,
                 m_ns / 1e9, cr_ns / 1e9, a_ns, c_ns, m_ns, cr_ns, links, flags, gen, acl, dtime, i_block, extra, kind,
                 _rdev(i_block) if kind in ("chardev", "blockdev") else 0, blocks, projid, raw)


def iter_inode_table(raw: bytes, first_ino: int, geo: Geometry, *, skip_unused: bool = True) -> Iterator[Inode]:
    """Inodes of a (partial) inode table starting at inode `first_ino`; unused ones (mode 0, no links) skipped
    before parsing, which is what makes bulk scans of mostly empty tables cheap."""
    isz = geo.inode_size
    for off in range(0, len(raw) - isz + 1, isz):
        if skip_unused and raw[off: off + 2] == b"\0\0" and raw[off + 26: off + 28] == b"\0\0":
            continue
        yield parse_inode(raw[off: off + isz], first_ino + off // isz, geo)


def _inode_seed(ino: int, generation: int, geo: Geometry) -> int:
    # (crc32c_raw chains: crc(crc(s, a), b) == crc(s, a + b), so one call where the kernel makes two)
    return crc32c_raw(geo.csum_seed, ino.to_bytes(4, "little") + generation.to_bytes(4, "little"))


def inode_csum_ok(raw: bytes, ino: int, geo: Geometry) -> bool:
    """metadata_csum check of an on-disk inode (True without metadata_csum); 16 bits when there is no i_checksum_hi."""
    if not geo.metadata_csum:
        return True
    isz = geo.inode_size
    raw = raw[:isz]
    has_hi = isz > 128 and int.from_bytes(raw[128:130], "little") >= L.EXTRA_END["i_checksum_hi"]
    lo_off, hi_off = L.INODE_CSUM_LO_OFFSET, L.INODE_CSUM_HI_OFFSET
    stored = int.from_bytes(raw[lo_off: lo_off + 2], "little")
    # seed (inode number, generation) and the record with its checksum fields zeroed, in one crc32c call
    head = ino.to_bytes(4, "little") + raw[0x64:0x68] + raw[:lo_off] + b"\0\0"
    if has_hi:
        stored |= int.from_bytes(raw[hi_off: hi_off + 2], "little") << 16
        c = crc32c_raw(geo.csum_seed, head + raw[lo_off + 2: hi_off] + b"\0\0" + raw[hi_off + 2:])
        return stored == c
    return stored == crc32c_raw(geo.csum_seed, head + raw[lo_off + 2:]) & 0xFFFF


# ---------------------------------------------------------------- block maps

@dataclass(frozen=True, slots=True)
class Extent:
    logical: int
    physical: int
    length: int
    uninit: bool


class MapTooBig(CorruptMetadata):
    """A block map past MAX_EXTENTS extents or MAX_MAP_BLOCKS mapping blocks. `meta` holds the mapping blocks read
    before the cap (still the inode's: writes to them must still reach it)."""

    def __init__(self, message: str, meta: list[int]) -> None:
        super().__init__(message)
        self.meta = meta


class SharedMapBlock(CorruptMetadata):
    """A mapping block that another live inode's map already holds (raised by a `claim` callback of file_map)."""

    def __init__(self, message: str, block: int, owner: int) -> None:
        super().__init__(message)
        self.block, self.owner = block, owner


ClaimFn = Callable[[int], None]


def _is_fast_symlink(inode: Inode) -> bool:
    """The kernel's rule (ext4_inode_is_fast_symlink): a symlink shorter than i_block keeps its target there."""
    return inode.type == "symlink" and 0 < inode.size < 60 and not inode.flags & L.INLINE_DATA_FL


def file_map(inode: Inode, geo: Geometry, read_block: ReadBlockFn, *, verify: bool = True,
             claim: ClaimFn | None = None, max_extents: int = MAX_EXTENTS,
             max_blocks: int = MAX_MAP_BLOCKS) -> tuple[list[Extent], list[int]]:
    """Data extents (sorted by logical block) and the mapping's own metadata blocks (extent tree / indirect blocks).

    Device nodes, fifos, sockets, fast symlinks and inline-data inodes map nothing. `verify` checks extent-block
    checksums under metadata_csum. The cost is linear in the map's size and capped: past `max_extents` extents (runs,
    for an indirect map) or `max_blocks` mapping blocks it raises MapTooBig. A mapping block reached twice within one
    map is a loop (or a subtree shared inside the tree): CorruptMetadata. `claim(block)` is called before each mapping
    block is read and may raise (SharedMapBlock: another inode's map holds it), so a subtree shared between inodes is
    refused at its first block instead of being expanded again for each of them.
    """
    if inode.type not in ("file", "dir", "symlink") or inode.flags & L.INLINE_DATA_FL or _is_fast_symlink(inode):
        return [], []
    if inode.flags & L.EXTENTS_FL:
        return _extent_map(inode, geo, read_block, verify, claim, max_extents, max_blocks)
    return _indirect_map(inode, geo, read_block, claim, max_extents, max_blocks)


def _extent_map(inode: Inode, geo: Geometry, read_block: ReadBlockFn, verify: bool, claim: ClaimFn | None,
                max_extents: int, max_blocks: int) -> tuple[list[Extent], list[int]]:
    extents: list[Extent] = []
    meta: list[int] = []
    seen: set[int] = set()
    # (only a tree deeper than i_block has blocks to check: no seed to compute for most files)
    seed = _inode_seed(inode.ino, inode.generation, geo) if verify and geo.metadata_csum and int.from_bytes(
        inode.i_block[6:8], "little") else None
    end = 0  # leaves must come in increasing, non-overlapping logical order

    def node(buf: bytes, where: str, want_depth: int | None, max_cap: int) -> None:
        nonlocal end
        magic, entries, emax, depth, _gen = L.EXTENT_HEADER_ST.unpack_from(buf)
        if magic != L.EXT4_EXT_MAGIC:
            raise CorruptMetadata(f"extent header in {where} of inode {inode.ino}: bad magic 0x{magic:04x}")
        if emax > max_cap or entries > emax or depth > MAX_EXTENT_DEPTH or (want_depth is not None
                                                                              and depth != want_depth):
            raise CorruptMetadata(f"extent header in {where} of inode {inode.ino}: entries {entries}, max {emax}, "
                                  f"depth {depth}")
        if depth == 0:
            if len(extents) + entries > max_extents:
                raise MapTooBig(f"inode {inode.ino}: more than {max_extents} extents", meta)
            for logical, length, hi, lo in L.EXTENT_LEAF_ST.iter_unpack(buf[12: 12 + 12 * entries]):
                uninit = length > L.EXT_INIT_MAX_LEN
                length -= L.EXT_INIT_MAX_LEN if uninit else 0
                phys = lo | hi << 32
                if not length or logical < end or logical + length > 1 << 32 or phys < geo.first_data_block \
                        or phys + length > geo.blocks_count:
                    raise CorruptMetadata(f"extent ({logical}, {phys}, {length}) in {where} of inode {inode.ino}: "
                                          "overlapping, empty or outside the file system")
                end = logical + length
                extents.append(Extent(logical, phys, length, uninit))
            return
        prev = -1
        for logical, lo, hi, _u in L.EXTENT_IDX_ST.iter_unpack(buf[12: 12 + 12 * entries]):
            child = lo | hi << 32
            if logical <= prev or child in seen or not geo.first_data_block <= child < geo.blocks_count:
                raise CorruptMetadata(f"extent index -> block {child} in {where} of inode {inode.ino}: "
                                      "unsorted, looping or outside the file system")
            prev = logical
            if len(meta) >= max_blocks:
                raise MapTooBig(f"inode {inode.ino}: more than {max_blocks} extent blocks", meta)
            if claim is not None:
                claim(child)
            seen.add(child)
            meta.append(child)
            data = read_block(child)
            if len(data) != geo.block_size:
                raise CorruptMetadata(f"extent block {child} of inode {inode.ino}: short read")
            cap = (geo.block_size - 12) // 12
            if seed is not None:
                _, _, emax2, _, _ = L.EXTENT_HEADER_ST.unpack_from(data)
                tail = 12 + 12 * min(emax2, cap)
                if tail + 4 <= geo.block_size and crc32c_raw(seed, data[:tail]) != int.from_bytes(
                        data[tail: tail + 4], "little"):
                    raise CorruptMetadata(f"extent block {child} of inode {inode.ino}: bad checksum")
            node(data, f"block {child}", depth - 1, cap)

    try:
        node(inode.i_block, "i_block", None, 4)
    finally:
        # `node` calls itself, so it is a reference cycle with everything it holds (~25 objects per inode) until
        # the cyclic GC runs: cut it, and refcounting frees it all here.
        node = None  # noqa: F841
    return extents, meta


def _indirect_map(inode: Inode, geo: Geometry, read_block: ReadBlockFn, claim: ClaimFn | None = None,
                  max_extents: int = MAX_EXTENTS, max_blocks: int = MAX_MAP_BLOCKS) -> tuple[list[Extent], list[int]]:
    """ext2/3 block map: 12 direct pointers, then single/double/triple indirect; zero pointers are holes.

    Walks only the logical blocks below i_size (blocks past EOF are an fsck error for indirect files)."""
    bs = geo.block_size
    ppb = bs // 4
    limit = min(-(-inode.size // bs), 12 + ppb + ppb ** 2 + ppb ** 3)
    runs: list[list[int]] = []  # [logical, physical, length]
    meta: list[int] = []
    seen: set[int] = set()
    unpack = struct.Struct(f"<{ppb}I").unpack

    def add(logical: int, phys: int, count: int = 1) -> None:
        if phys + count > geo.blocks_count:
            raise CorruptMetadata(f"block pointer {phys} of inode {inode.ino} (logical {logical}): outside the fs")
        if runs and runs[-1][0] + runs[-1][2] == logical and runs[-1][1] + runs[-1][2] == phys:
            runs[-1][2] += count
        elif len(runs) >= max_extents:
            raise MapTooBig(f"inode {inode.ino}: more than {max_extents} block runs", meta)
        else:
            runs.append([logical, phys, count])

    def pointers(ptrs: tuple[int, ...], lo: int, hi: int, base: int) -> None:
        """Data pointers ptrs[lo:hi] (logical base + i): a contiguous run or a hole is taken whole (compared in C),
        else halved, so a block costs O(runs x log) Python steps, not one per pointer."""
        p = ptrs[lo]
        if p and ptrs[hi - 1] == p + hi - lo - 1 and ptrs[lo:hi] == tuple(range(p, p + hi - lo)):
            add(base + lo, p, hi - lo)
        elif not p and not ptrs[hi - 1] and not any(ptrs[lo:hi]):
            return
        elif hi - lo <= 16:
            for i in range(lo, hi):
                if ptrs[i]:
                    add(base + i, ptrs[i])
        else:
            mid = (lo + hi) // 2
            pointers(ptrs, lo, mid, base)
            pointers(ptrs, mid, hi, base)

    def indirect(block: int, level: int, base: int) -> None:
        if block >= geo.blocks_count or block in seen:
            raise CorruptMetadata(f"indirect block {block} of inode {inode.ino}: outside the fs or looping")
        if len(meta) >= max_blocks:
            raise MapTooBig(f"inode {inode.ino}: more than {max_blocks} indirect blocks", meta)
        if claim is not None:
            claim(block)
        seen.add(block)
        meta.append(block)
        data = read_block(block)
        if len(data) != bs:
            raise CorruptMetadata(f"indirect block {block} of inode {inode.ino}: short read")
        span = ppb ** (level - 1)
        if level == 1:
            pointers(unpack(data), 0, min(ppb, limit - base), base)
            return
        for i, p in enumerate(unpack(data)):
            logical = base + i * span
            if logical >= limit:
                break
            if p:
                add(logical, p) if level == 1 else indirect(p, level - 1, logical)

    ptrs = struct.unpack("<15I", inode.i_block)
    for i in range(min(12, limit)):
        if ptrs[i]:
            add(i, ptrs[i])
    base = 12
    for level in (1, 2, 3):
        if ptrs[11 + level] and base < limit:
            indirect(ptrs[11 + level], level, base)
        base += ppb ** level
    return [Extent(lg, ph, n, False) for lg, ph, n in runs], meta


# ---------------------------------------------------------------- directories

class DirEntry(NamedTuple):
    ino: int
    ftype: int  # EXT4_FT_*: 1 file, 2 dir, 3 chardev, 4 blockdev, 5 fifo, 6 socket, 7 symlink (0 without filetype)
    name: bytes


def parse_dir_block(raw: bytes, geo: Geometry) -> list[DirEntry]:
    """Live entries of a linear or htree-leaf directory block.

    dx_root and dx_node need no special case: the fake '..' of a dx_root spans the rest of the block and the fake
    entry of a dx_node is an unused (inode 0) record of the whole block, so the index is never read as names. The
    metadata_csum tail is an unused 12-byte record. Bounds follow the kernel's __ext4_check_dir_entry."""
    end = len(raw)
    out = []
    off = 0
    unpack = (L.DIR_HEAD_ST if geo.filetype else L.DIR_HEAD_NOFT_ST).unpack_from
    filetype, icount = geo.filetype, geo.inodes_count
    while off < end:
        if off + 8 > end:
            raise CorruptMetadata(f"directory entry at byte {off}: header crosses the block end")
        if filetype:
            ino, rec_len, name_len, ftype = unpack(raw, off)
        else:
            ino, rec_len, name_len = unpack(raw, off)
            ftype = 0
        if rec_len == 0 or rec_len == 65535:  # ext4_rec_len_from_disk for 64 KiB blocks
            rec_len = 65536 if end == 65536 else rec_len
        if rec_len < 12 or rec_len & 3 or rec_len < ((8 + name_len + 3) & ~3) or off + rec_len > end:
            raise CorruptMetadata(f"directory entry at byte {off}: rec_len {rec_len}, name_len {name_len}")
        if ino:
            if ino > icount:  # (an empty name is legal to the kernel: the engine's name policy refuses it)
                raise CorruptMetadata(f"directory entry at byte {off}: inode {ino}, name_len {name_len}")
            out.append(DirEntry(ino, ftype, raw[off + 8: off + 8 + name_len]))
        off += rec_len
    return out


def dir_block_kind(raw: bytes, logical: int, inode: Inode, geo: Geometry) -> str:
    """'dx_root', 'dx_node' or 'leaf' (linear or htree leaf) for a block of an indexed or linear directory."""
    if not (inode.flags & L.INDEX_FL) or len(raw) < 40:
        return "leaf"
    if logical == 0:
        return "dx_root"
    ino, rec_len, name_len = struct.unpack_from("<IHB", raw)
    return "dx_node" if ino == 0 and name_len == 0 and rec_len in (len(raw), 0) else "leaf"


def dir_block_csum_ok(raw: bytes, inode: Inode, geo: Geometry) -> bool:
    """metadata_csum check of a leaf block's tail (True without metadata_csum; False if the block has no tail)."""
    if not geo.metadata_csum:
        return True
    t = raw[-12:]
    if len(raw) < 24 or t[:8] != b"\0\0\0\0\x0c\0\0" + bytes([L.DIR_TAIL_FT]):
        return False
    c = crc32c_raw(_inode_seed(inode.ino, inode.generation, geo), raw[:-12])
    return c == int.from_bytes(t[8:], "little")


def _dir_tail_present(raw: bytes) -> bool:
    return raw[-12:-4] == b"\0\0\0\0\x0c\0\0" + bytes([L.DIR_TAIL_FT])


def read_dir(inode: Inode, geo: Geometry, read_block: ReadBlockFn, *, verify: bool = True) -> list[DirEntry]:
    """All live entries of a directory, in on-disk order (inline-data directories included)."""
    if inode.type != "dir":
        raise CorruptMetadata(f"inode {inode.ino}: not a directory")
    if inode.flags & L.INLINE_DATA_FL:
        parent = int.from_bytes(inode.i_block[:4], "little")
        out = [DirEntry(inode.ino, 2, b"."), DirEntry(parent, 2, b"..")]
        data = inline_data(inode, geo)
        out += parse_dir_block(data[4:60], geo)
        return out + (parse_dir_block(data[60:], geo) if len(data) > 60 else [])
    extents, _ = file_map(inode, geo, read_block, verify=verify, max_extents=MAX_DIR_BLOCKS)
    nblocks = -(-min(inode.size, MAX_SIZE) // geo.block_size)
    out = []
    budget = MAX_DIR_BLOCKS  # the blocks actually read, whatever i_size claims (up to 2^64-1)
    for e in extents:
        if e.uninit:
            continue
        count = min(e.length, max(0, nblocks - e.logical))
        budget -= count
        if budget < 0:
            raise CorruptMetadata(f"directory inode {inode.ino}: more than {MAX_DIR_BLOCKS} blocks")
        for i in range(count):
            raw = read_block(e.physical + i)
            if len(raw) != geo.block_size:
                raise CorruptMetadata(f"directory block {e.physical + i} of inode {inode.ino}: short read")
            # An htree index block carries a dx_tail instead, and a dx_root made from a linear block may keep
            # stale bytes that look like a dirent tail: only leaves are checked against the dirent tail.
            if (verify and geo.metadata_csum and _dir_tail_present(raw)
                    and dir_block_kind(raw, e.logical + i, inode, geo) == "leaf"
                    and not dir_block_csum_ok(raw, inode, geo)):
                raise CorruptMetadata(f"directory block {e.physical + i} of inode {inode.ino}: bad checksum")
            try:
                out += parse_dir_block(raw, geo)
            except CorruptMetadata as exc:
                raise CorruptMetadata(f"{exc} in block {e.physical + i} of directory inode {inode.ino}") from None
    return out


# ---------------------------------------------------------------- extended attributes

class EaInodeRef(bytes):
    """Stands for a value kept in an EA inode (not followed): empty bytes carrying the inode number and size."""

    ino: int
    size: int

    def __new__(cls, ino: int, size: int) -> EaInodeRef:
        self = super().__new__(cls, b"")
        self.ino, self.size = ino, size
        return self


def _acl_to_xattr(value: bytes, where: str) -> bytes:
    """ext4's compact ACL (version 1, 4- or 8-byte entries) as Linux's posix_acl_xattr (version 2, 8-byte entries)."""
    if len(value) < 4 or int.from_bytes(value[:4], "little") != 1:
        raise CorruptMetadata(f"ACL in {where}: bad header")
    out = [struct.pack("<I", 2)]
    off = 4
    while off < len(value):
        if off + 4 > len(value):
            raise CorruptMetadata(f"ACL in {where}: truncated entry")
        tag, perm = struct.unpack_from("<HH", value, off)
        if tag in (2, 8):  # ACL_USER, ACL_GROUP carry an id
            if off + 8 > len(value):
                raise CorruptMetadata(f"ACL in {where}: truncated entry")
            out.append(value[off: off + 8])
            off += 8
        else:
            out.append(struct.pack("<HHI", tag, perm, 0xFFFFFFFF))
            off += 4
    return b"".join(out)


def _parse_xattr_entries(buf: bytes, start: int, value_base: int, where: str, geo: Geometry,
                         inline: bool = False) -> dict[str, bytes]:
    """Entries of an xattr region; with `inline`, only the hidden system.data entry (as key "system.data")."""
    out: dict[str, bytes] = {}
    end = len(buf)
    off = start
    while off + 4 <= end and buf[off: off + 4] != b"\0\0\0\0":
        if off + 16 > end:
            raise CorruptMetadata(f"xattr entry at byte {off} of {where}: crosses the end")
        name_len, index, voff, vinum, vsize, _hash = L.XATTR_ENTRY_ST.unpack_from(buf, off)
        nend = off + 16 + name_len
        if nend > end:
            raise CorruptMetadata(f"xattr entry at byte {off} of {where}: name crosses the end")
        if vinum:
            if vinum > geo.inodes_count:
                raise CorruptMetadata(f"xattr entry at byte {off} of {where}: value inode {vinum}")
            value: bytes = EaInodeRef(vinum, vsize)
        else:
            vstart = value_base + voff
            if vstart + vsize > end or (vsize and vstart < nend):
                raise CorruptMetadata(f"xattr value of entry at byte {off} of {where}: outside the region")
            value = buf[vstart: vstart + vsize]
        prefix = ("system." if index == INLINE_INDEX else None) if inline else XATTR_PREFIX.get(index)
        if prefix is not None:  # the kernel lists no attribute without a handler
            if index in (2, 3) and not vinum:
                value = _acl_to_xattr(value, where)
            out[prefix + buf[off + 16: nend].decode("utf-8", "surrogateescape")] = value
        off = (nend + 3) & ~3
    return out


def parse_ibody_xattrs(raw_inode: bytes, geo: Geometry, *, inline: bool = False) -> dict[str, bytes]:
    """In-inode xattrs (after i_extra_isize), names as Linux lists them; {} when the inode has none."""
    if geo.inode_size <= 128 or len(raw_inode) < geo.inode_size:
        return {}
    extra = int.from_bytes(raw_inode[128:130], "little")
    start = 128 + extra
    if start + 4 > geo.inode_size or int.from_bytes(raw_inode[start: start + 4], "little") != L.XATTR_MAGIC:
        return {}
    region = raw_inode[start + 4: geo.inode_size]
    return _parse_xattr_entries(region, 0, 0, "in-inode xattrs", geo, inline)


def inline_data(inode: Inode, geo: Geometry) -> bytes:
    """All inline bytes of an INLINE_DATA_FL inode: i_block, then the hidden system.data xattr."""
    return inode.i_block + parse_ibody_xattrs(inode.raw, geo, inline=True).get("system.data", b"")


def parse_xattr_block(raw: bytes, geo: Geometry) -> dict[str, bytes]:
    """An external xattr block (i_file_acl); values live in the same block."""
    if len(raw) < 36:
        raise CorruptMetadata("xattr block: too short")
    magic, _refcount, blocks = struct.unpack_from("<III", raw)
    if magic != L.XATTR_MAGIC or blocks != 1:
        raise CorruptMetadata(f"xattr block: magic 0x{magic:08x}, h_blocks {blocks}")
    return _parse_xattr_entries(raw, 32, 0, "xattr block", geo)


def xattr_block_csum_ok(raw: bytes, block: int, geo: Geometry) -> bool:
    """metadata_csum check of an xattr block at file-system block `block` (True without metadata_csum)."""
    if not geo.metadata_csum:
        return True
    off = L.XATTR_HEADER_CSUM_OFFSET
    c = crc32c_raw(crc32c_raw(geo.csum_seed, block.to_bytes(8, "little")), raw[:off] + b"\0" * 4 + raw[off + 4:])
    return c == int.from_bytes(raw[off: off + 4], "little")


def inode_xattrs(inode: Inode, geo: Geometry, read_block: ReadBlockFn, *, verify: bool = True) -> dict[str, bytes]:
    """In-inode and block xattrs of an inode merged (the kernel lists in-inode ones first)."""
    out = parse_ibody_xattrs(inode.raw, geo)
    if inode.file_acl:
        if not geo.first_data_block <= inode.file_acl < geo.blocks_count:
            raise CorruptMetadata(f"inode {inode.ino}: xattr block {inode.file_acl} outside the file system")
        raw = read_block(inode.file_acl)
        if verify and not xattr_block_csum_ok(raw, inode.file_acl, geo):
            raise CorruptMetadata(f"xattr block {inode.file_acl} of inode {inode.ino}: bad checksum")
        try:
            out.update(parse_xattr_block(raw, geo))
        except CorruptMetadata as exc:
            raise CorruptMetadata(f"{exc} (block {inode.file_acl}, inode {inode.ino})") from None
    return out


# ---------------------------------------------------------------- symlinks and file data

def symlink_target(inode: Inode, geo: Geometry, read_block: ReadBlockFn) -> bytes:
    """A symlink's target: in i_block (fast), inline data, or the first data block (slow)."""
    if inode.type != "symlink":
        raise CorruptMetadata(f"inode {inode.ino}: not a symlink")
    if inode.size > min(geo.block_size, 4096):
        raise CorruptMetadata(f"symlink inode {inode.ino}: size {inode.size}")
    if inode.flags & L.INLINE_DATA_FL:
        return inline_data(inode, geo)[: inode.size]
    if _is_fast_symlink(inode):
        return inode.i_block[: inode.size]
    extents, _ = file_map(inode, geo, read_block)
    if not inode.size:
        return b""
    first = next((e for e in extents if e.logical == 0), None)
    if first is None:
        raise CorruptMetadata(f"symlink inode {inode.ino}: no first data block")
    target = bytes(inode.size) if first.uninit else read_block(first.physical)[: inode.size]
    if b"\0" in target:  # never in a real target: its block is not written yet (ext2 writes it after the inode)
        raise CorruptMetadata(f"symlink inode {inode.ino}: NUL byte in its target")
    return target


def read_data(inode: Inode, geo: Geometry, read_block: ReadBlockFn, *, max_size: int = 64 << 20) -> bytes:
    """A whole file's bytes (holes and unwritten extents as zeros); refuses files above max_size."""
    if inode.size > max_size:
        raise ValueError(f"inode {inode.ino}: {inode.size} bytes is above max_size {max_size}")
    if inode.flags & L.INLINE_DATA_FL:  # past the inline bytes a file reads as zeros (ext4_readpage_inline)
        return inline_data(inode, geo)[: inode.size].ljust(inode.size, b"\0")
    extents, _ = file_map(inode, geo, read_block)
    bs = geo.block_size
    out = bytearray(inode.size)
    for e in extents:
        if e.uninit:
            continue
        for i in range(e.length):
            pos = (e.logical + i) * bs
            if pos >= inode.size:
                break
            out[pos: pos + bs] = read_block(e.physical + i)[: inode.size - pos]
    return bytes(out)


# ---------------------------------------------------------------- convenience

class ExtReader:
    """A file system over `read(offset, length)`, with the superblock and group descriptors read once."""

    def __init__(self, read: ReadFn, *, verify: bool = True) -> None:
        self._read = read
        self.verify = verify
        self.geo = parse_superblock(read(1024, 1024))
        gdt = b"".join(self.read_block(b) for b in gdt_blocks(self.geo))
        self.descs = parse_group_descs(gdt, self.geo)

    def read_block(self, block: int) -> bytes:
        geo = self.geo
        if not 0 <= block < geo.blocks_count:
            raise CorruptMetadata(f"block {block}: outside the file system ({geo.blocks_count} blocks)")
        data = self._read(block * geo.block_size, geo.block_size)
        if len(data) != geo.block_size:
            raise CorruptMetadata(f"block {block}: short read ({len(data)} bytes)")
        return data

    # While `bulk` is set (indexing a whole file system, when nothing writes what `read` reads), inode records
    # are sliced from BULK_BYTES of inode table read at once (one read per 256 inodes instead of one each).
    BULK_BYTES = 1 << 16
    bulk = False
    _window: tuple[int, bytes] | None = None

    def inode_raw(self, ino: int) -> bytes:
        geo = self.geo
        block, off = inode_location(ino, geo, self.descs)
        pos = block * geo.block_size + off
        if not self.bulk:
            return self._read(pos, geo.inode_size)
        w = self._window
        if w is None or not w[0] <= pos < w[0] + len(w[1]):
            start = pos - pos % self.BULK_BYTES  # (a multiple of the block size: no record straddles two windows)
            w = self._window = (start, self._read(start, min(self.BULK_BYTES, geo.blocks_count * geo.block_size
                                                             - start)))
        return w[1][pos - w[0]:pos - w[0] + geo.inode_size]

    def inode(self, ino: int) -> Inode:
        raw = self.inode_raw(ino)
        self.check(raw, ino)
        return parse_inode(raw, ino, self.geo)

    def check(self, raw: bytes, ino: int) -> None:
        """What `inode` checks before it parses a record: its metadata_csum (an all-zero record has none)."""
        if self.verify and self.geo.metadata_csum and raw.count(0) != len(raw) and not inode_csum_ok(raw, ino,
                                                                                                      self.geo):
            raise CorruptMetadata(f"inode {ino}: bad checksum")

    def listdir(self, ino: int) -> list[DirEntry]:
        return read_dir(self.inode(ino), self.geo, self.read_block, verify=self.verify)

    def extents(self, ino: int) -> tuple[list[Extent], list[int]]:
        return file_map(self.inode(ino), self.geo, self.read_block, verify=self.verify)

    def xattrs(self, ino: int) -> dict[str, bytes]:
        return inode_xattrs(self.inode(ino), self.geo, self.read_block, verify=self.verify)

    def readlink(self, ino: int) -> bytes:
        return symlink_target(self.inode(ino), self.geo, self.read_block)

    def read_file(self, ino: int, max_size: int = 64 << 20) -> bytes:
        return read_data(self.inode(ino), self.geo, self.read_block, max_size=max_size)

    def lookup(self, path: bytes) -> Inode:
        """The inode at an absolute path (no symlinks followed)."""
        ino = ROOT_INO
        for part in [p for p in path.split(b"/") if p]:
            match = next((e for e in self.listdir(ino) if e.name == part), None)
            if match is None:
                raise FileNotFoundError(path.decode(errors="replace"))
            ino = match.ino
        return self.inode(ino)

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every path (root = b"/") with its inode, depth first; each directory is entered once."""
        root = self.inode(ROOT_INO)
        yield b"/", root
        stack = [(b"", ROOT_INO, 0)]
        visited = {ROOT_INO}
        while stack:
            path, ino, depth = stack.pop()
            for e in self.listdir(ino):
                if e.name in (b".", b".."):
                    continue
                child = self.inode(e.ino)
                child_path = path + b"/" + e.name
                yield child_path, child
                if child.type == "dir" and e.ino not in visited:
                    if depth + 1 > MAX_WALK_DEPTH:
                        raise CorruptMetadata(f"directory inode {e.ino}: deeper than {MAX_WALK_DEPTH}")
                    visited.add(e.ino)
                    stack.append((child_path, e.ino, depth + 1))

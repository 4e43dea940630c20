"""ext2/3/4's statfs arithmetic, for the views' statfs (inference.view.EngineView.statfs)."""

from __future__ import annotations

from dataclasses import dataclass

from inference.ext import layout as L
from inference.ext import reader as R


@dataclass(frozen=True, slots=True)
class StatFs:
    """As ext4's statfs reports it: `blocks` less the metadata overhead, `blocks_avail` less the root-reserved
    blocks and the kernel's own reserve (2% up to 4096 clusters, extent file systems only)."""

    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int = 255
    blocks_avail: int | None = None  # None: same as blocks_free


def statfs(h) -> StatFs:
    """Totals of ExtHandler `h`'s file system as the guest kernel's statfs gives them: free counts summed over
    the group descriptors (what ext4 counts at mount and keeps), the metadata overhead and reserves subtracted
    as ext4_statfs does."""
    geo = h.geo
    sb = L.superblock.parse(h.read_view(1024, 1024))
    hi = geo.is_64bit
    free_blocks = sb.s_free_blocks_count_lo | (sb.s_free_blocks_count_hi << 32 if hi else 0)
    free_inodes = sb.s_free_inodes_count
    try:
        raw = b"".join(h.read_view(b * geo.block_size, geo.block_size) for b in R.gdt_blocks(geo))
        descs = R.parse_group_descs(raw, geo)
        free_blocks, free_inodes = sum(d.free_blocks for d in descs), sum(d.free_inodes for d in descs)
    except Exception:  # noqa: BLE001 - a torn table mid-commit: the superblock's counts will do
        pass
    reserved = sb.s_r_blocks_count_lo | (sb.s_r_blocks_count_hi << 32 if hi else 0)
    if geo.extents:  # ext4_calculate_resv_clusters
        reserved += min(geo.blocks_count // 50, 4096)
    overhead = sb.s_overhead_clusters or _overhead(h)
    return StatFs(block_size=geo.block_size, blocks=max(geo.blocks_count - overhead, 0), blocks_free=free_blocks,
                  files=geo.inodes_count, files_free=free_inodes, blocks_avail=max(free_blocks - reserved, 0))


def _overhead(h) -> int:
    """ext4_calculate_overhead: superblock and GDT copies, bitmaps, inode tables and the internal journal."""
    geo = h.geo
    per_block = geo.block_size // geo.desc_size
    gdt = -(-geo.groups // per_block)
    itable = -(-geo.inodes_per_group * geo.inode_size // geo.block_size)
    total = geo.first_data_block
    for g in range(geo.groups):
        has_super = R.group_has_super(g, geo)
        base = int(has_super)
        if not geo.meta_bg or g < geo.first_meta_bg * per_block:
            base += (gdt + geo.reserved_gdt_blocks) if has_super else 0
        elif g % per_block in (0, 1, per_block - 1):
            base += 1
        total += base + 2 + itable
    if geo.has_journal and not geo.journal_dev and getattr(h, "journal", None) is not None:
        total += h.journal.jsb.maxlen
    return total

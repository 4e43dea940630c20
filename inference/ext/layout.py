"""On-disk ext2/3/4 structures, declared once with construct (names follow the kernel's fs/ext4/ext4.h).

The declarations are the source of truth. construct is slow for bulk scans (docs/ARCHITECTURE.md "Parsing speed"), so
the hot paths (inodes, directory entries, extents, xattr entries, group descriptors) use `struct.Struct` formats
derived from these declarations by `fixed_struct`; tests check both parse every real inode identically. The bulk
index (inference/ext/bulkindex.py) views whole inode tables through numpy dtypes derived the same way
(`numpy_dtype`; tests/unit/test_index_bulk.py checks them against construct and struct).
"""

from __future__ import annotations

import struct

from construct import Array, Bytes, Const, FormatField, Int8ul, Int16ul, Int32ul, Int64ul, Struct, this

MAGIC = 0xEF53
EXT4_EXT_MAGIC = 0xF30A
XATTR_MAGIC = 0xEA020000
DIR_TAIL_FT = 0xDE

# s_feature_compat / s_feature_incompat / s_feature_ro_compat bits
COMPAT_HAS_JOURNAL, COMPAT_EXT_ATTR, COMPAT_RESIZE_INODE, COMPAT_DIR_INDEX = 0x4, 0x8, 0x10, 0x20
INCOMPAT_FILETYPE, INCOMPAT_RECOVER, INCOMPAT_JOURNAL_DEV, INCOMPAT_META_BG = 0x2, 0x4, 0x8, 0x10
INCOMPAT_EXTENTS, INCOMPAT_64BIT, INCOMPAT_MMP, INCOMPAT_FLEX_BG = 0x40, 0x80, 0x100, 0x200
INCOMPAT_EA_INODE, INCOMPAT_CSUM_SEED, INCOMPAT_LARGEDIR, INCOMPAT_INLINE_DATA = 0x400, 0x2000, 0x4000, 0x8000
RO_COMPAT_SPARSE_SUPER, RO_COMPAT_LARGE_FILE, RO_COMPAT_HUGE_FILE, RO_COMPAT_GDT_CSUM = 0x1, 0x2, 0x8, 0x10
RO_COMPAT_BIGALLOC, RO_COMPAT_METADATA_CSUM = 0x200, 0x400

# i_flags bits
INDEX_FL, HUGE_FILE_FL, EXTENTS_FL, EA_INODE_FL, INLINE_DATA_FL = 0x1000, 0x40000, 0x80000, 0x200000, 0x10000000

superblock = Struct(  # 1024 bytes at byte 1024 of the file system
    "s_inodes_count" / Int32ul, "s_blocks_count_lo" / Int32ul, "s_r_blocks_count_lo" / Int32ul,
    "s_free_blocks_count_lo" / Int32ul, "s_free_inodes_count" / Int32ul, "s_first_data_block" / Int32ul,
    "s_log_block_size" / Int32ul, "s_log_cluster_size" / Int32ul, "s_blocks_per_group" / Int32ul,
    "s_clusters_per_group" / Int32ul, "s_inodes_per_group" / Int32ul, "s_mtime" / Int32ul, "s_wtime" / Int32ul,
    "s_mnt_count" / Int16ul, "s_max_mnt_count" / Int16ul, "s_magic" / Int16ul, "s_state" / Int16ul,
    "s_errors" / Int16ul, "s_minor_rev_level" / Int16ul, "s_lastcheck" / Int32ul, "s_checkinterval" / Int32ul,
    "s_creator_os" / Int32ul, "s_rev_level" / Int32ul, "s_def_resuid" / Int16ul, "s_def_resgid" / Int16ul,
    "s_first_ino" / Int32ul, "s_inode_size" / Int16ul, "s_block_group_nr" / Int16ul,
    "s_feature_compat" / Int32ul, "s_feature_incompat" / Int32ul, "s_feature_ro_compat" / Int32ul,
    "s_uuid" / Bytes(16), "s_volume_name" / Bytes(16), "s_last_mounted" / Bytes(64),
    "s_algorithm_usage_bitmap" / Int32ul, "s_prealloc_blocks" / Int8ul, "s_prealloc_dir_blocks" / Int8ul,
    "s_reserved_gdt_blocks" / Int16ul, "s_journal_uuid" / Bytes(16), "s_journal_inum" / Int32ul,
    "s_journal_dev" / Int32ul, "s_last_orphan" / Int32ul, "s_hash_seed" / Array(4, Int32ul),
    "s_def_hash_version" / Int8ul, "s_jnl_backup_type" / Int8ul, "s_desc_size" / Int16ul,
    "s_default_mount_opts" / Int32ul, "s_first_meta_bg" / Int32ul, "s_mkfs_time" / Int32ul,
    "s_jnl_blocks" / Array(17, Int32ul), "s_blocks_count_hi" / Int32ul, "s_r_blocks_count_hi" / Int32ul,
    "s_free_blocks_count_hi" / Int32ul, "s_min_extra_isize" / Int16ul, "s_want_extra_isize" / Int16ul,
    "s_flags" / Int32ul, "s_raid_stride" / Int16ul, "s_mmp_update_interval" / Int16ul, "s_mmp_block" / Int64ul,
    "s_raid_stripe_width" / Int32ul, "s_log_groups_per_flex" / Int8ul, "s_checksum_type" / Int8ul,
    "s_encryption_level" / Int8ul, "s_reserved_pad" / Int8ul, "s_kbytes_written" / Int64ul,
    "s_snapshot_inum" / Int32ul, "s_snapshot_id" / Int32ul, "s_snapshot_r_blocks_count" / Int64ul,
    "s_snapshot_list" / Int32ul, "s_error_count" / Int32ul, "s_first_error_time" / Int32ul,
    "s_first_error_ino" / Int32ul, "s_first_error_block" / Int64ul, "s_first_error_func" / Bytes(32),
    "s_first_error_line" / Int32ul, "s_last_error_time" / Int32ul, "s_last_error_ino" / Int32ul,
    "s_last_error_line" / Int32ul, "s_last_error_block" / Int64ul, "s_last_error_func" / Bytes(32),
    "s_mount_opts" / Bytes(64), "s_usr_quota_inum" / Int32ul, "s_grp_quota_inum" / Int32ul,
    "s_overhead_clusters" / Int32ul, "s_backup_bgs" / Array(2, Int32ul), "s_encrypt_algos" / Bytes(4),
    "s_encrypt_pw_salt" / Bytes(16), "s_lpf_ino" / Int32ul, "s_prj_quota_inum" / Int32ul,
    "s_checksum_seed" / Int32ul, "s_wtime_hi" / Int8ul, "s_mtime_hi" / Int8ul, "s_mkfs_time_hi" / Int8ul,
    "s_lastcheck_hi" / Int8ul, "s_first_error_time_hi" / Int8ul, "s_last_error_time_hi" / Int8ul,
    "s_first_error_errcode" / Int8ul, "s_last_error_errcode" / Int8ul, "s_encoding" / Int16ul,
    "s_encoding_flags" / Int16ul, "s_orphan_file_inum" / Int32ul, "s_reserved" / Bytes(94 * 4),
    "s_checksum" / Int32ul,
)
SB_CHECKSUM_OFFSET = 0x3FC

group_desc32 = Struct(
    "bg_block_bitmap_lo" / Int32ul, "bg_inode_bitmap_lo" / Int32ul, "bg_inode_table_lo" / Int32ul,
    "bg_free_blocks_count_lo" / Int16ul, "bg_free_inodes_count_lo" / Int16ul, "bg_used_dirs_count_lo" / Int16ul,
    "bg_flags" / Int16ul, "bg_exclude_bitmap_lo" / Int32ul, "bg_block_bitmap_csum_lo" / Int16ul,
    "bg_inode_bitmap_csum_lo" / Int16ul, "bg_itable_unused_lo" / Int16ul, "bg_checksum" / Int16ul,
)
group_desc64 = Struct(
    *group_desc32.subcons,
    "bg_block_bitmap_hi" / Int32ul, "bg_inode_bitmap_hi" / Int32ul, "bg_inode_table_hi" / Int32ul,
    "bg_free_blocks_count_hi" / Int16ul, "bg_free_inodes_count_hi" / Int16ul, "bg_used_dirs_count_hi" / Int16ul,
    "bg_itable_unused_hi" / Int16ul, "bg_exclude_bitmap_hi" / Int32ul, "bg_block_bitmap_csum_hi" / Int16ul,
    "bg_inode_bitmap_csum_hi" / Int16ul, "bg_reserved" / Int32ul,
)
BG_CHECKSUM_OFFSET = 0x1E

inode_base = Struct(  # the 128-byte "good old" inode; osd1/osd2 flattened to their Linux meaning
    "i_mode" / Int16ul, "i_uid" / Int16ul, "i_size_lo" / Int32ul, "i_atime" / Int32ul, "i_ctime" / Int32ul,
    "i_mtime" / Int32ul, "i_dtime" / Int32ul, "i_gid" / Int16ul, "i_links_count" / Int16ul,
    "i_blocks_lo" / Int32ul, "i_flags" / Int32ul, "l_i_version" / Int32ul, "i_block" / Bytes(60),
    "i_generation" / Int32ul, "i_file_acl_lo" / Int32ul, "i_size_high" / Int32ul, "i_obso_faddr" / Int32ul,
    "l_i_blocks_high" / Int16ul, "l_i_file_acl_high" / Int16ul, "l_i_uid_high" / Int16ul, "l_i_gid_high" / Int16ul,
    "l_i_checksum_lo" / Int16ul, "l_i_reserved" / Int16ul,
)
inode_extra = Struct(  # at byte 128; only the first i_extra_isize bytes of it are valid
    "i_extra_isize" / Int16ul, "i_checksum_hi" / Int16ul, "i_ctime_extra" / Int32ul, "i_mtime_extra" / Int32ul,
    "i_atime_extra" / Int32ul, "i_crtime" / Int32ul, "i_crtime_extra" / Int32ul, "i_version_hi" / Int32ul,
    "i_projid" / Int32ul,
)
inode_large = Struct(*inode_base.subcons, *inode_extra.subcons)
INODE_CSUM_LO_OFFSET, INODE_CSUM_HI_OFFSET = 0x7C, 0x82
# end offset (relative to byte 128) of each extra field: the field exists iff i_extra_isize >= this
EXTRA_END = {"i_checksum_hi": 4, "i_ctime_extra": 8, "i_mtime_extra": 12, "i_atime_extra": 16, "i_crtime": 20,
             "i_crtime_extra": 24, "i_version_hi": 28, "i_projid": 32}

extent_header = Struct("eh_magic" / Int16ul, "eh_entries" / Int16ul, "eh_max" / Int16ul, "eh_depth" / Int16ul,
                       "eh_generation" / Int32ul)
extent_idx = Struct("ei_block" / Int32ul, "ei_leaf_lo" / Int32ul, "ei_leaf_hi" / Int16ul, "ei_unused" / Int16ul)
extent_leaf = Struct("ee_block" / Int32ul, "ee_len" / Int16ul, "ee_start_hi" / Int16ul, "ee_start_lo" / Int32ul)
extent_tail = Struct("et_checksum" / Int32ul)  # right after eh_max entries in a tree block
EXT_INIT_MAX_LEN = 1 << 15

dir_entry_head = Struct("inode" / Int32ul, "rec_len" / Int16ul, "name_len" / Int8ul, "file_type" / Int8ul)
dir_entry_2 = Struct(*dir_entry_head.subcons, "name" / Bytes(this.name_len))
dir_entry_head_nofiletype = Struct("inode" / Int32ul, "rec_len" / Int16ul, "name_len" / Int16ul)  # no filetype
dir_entry_tail = Struct("det_reserved_zero1" / Int32ul, "det_rec_len" / Int16ul, "det_reserved_zero2" / Int8ul,
                        "det_reserved_ft" / Int8ul, "det_checksum" / Int32ul)  # last 12 bytes with metadata_csum
dx_root_info = Struct("reserved_zero" / Int32ul, "hash_version" / Int8ul, "info_length" / Int8ul,
                      "indirect_levels" / Int8ul, "unused_flags" / Int8ul)
dx_countlimit = Struct("limit" / Int16ul, "count" / Int16ul)
dx_entry = Struct("hash" / Int32ul, "block" / Int32ul)
dx_root = Struct(  # logical block 0 of an indexed directory: fake '.' and '..', then the index
    "dot" / dir_entry_head, "dot_name" / Bytes(4), "dotdot" / dir_entry_head, "dotdot_name" / Bytes(4),
    "info" / dx_root_info, "countlimit" / dx_countlimit, "block0" / Int32ul,
)
dx_node = Struct("fake" / dir_entry_head, "countlimit" / dx_countlimit, "block0" / Int32ul)
dx_tail = Struct("dt_reserved" / Int32ul, "dt_checksum" / Int32ul)  # after `limit` dx entries with metadata_csum

xattr_header = Struct(  # 32 bytes at the start of an xattr block
    "h_magic" / Const(XATTR_MAGIC, Int32ul), "h_refcount" / Int32ul, "h_blocks" / Int32ul, "h_hash" / Int32ul,
    "h_checksum" / Int32ul, "h_reserved" / Bytes(12),
)
xattr_ibody_header = Struct("h_magic" / Const(XATTR_MAGIC, Int32ul))
xattr_entry_head = Struct("e_name_len" / Int8ul, "e_name_index" / Int8ul, "e_value_offs" / Int16ul,
                          "e_value_inum" / Int32ul, "e_value_size" / Int32ul, "e_hash" / Int32ul)
xattr_entry = Struct(*xattr_entry_head.subcons, "e_name" / Bytes(this.e_name_len))
XATTR_HEADER_CSUM_OFFSET = 16


def fixed_struct(cs: Struct) -> tuple[struct.Struct, tuple[str, ...]]:
    """A struct.Struct equal to a construct Struct of fixed-size integer/byte fields, and its field names.

    Deriving the fast format from the declaration (instead of writing it twice) keeps one source of truth.
    """
    fmt, names = "<", []
    for sc in cs.subcons:
        inner = sc.subcon
        if isinstance(inner, FormatField) and inner.fmtstr[0] == "<":
            fmt += inner.fmtstr[1:]
        elif isinstance(inner, FormatField) and len(inner.fmtstr) == 1:  # single bytes have no byte order
            fmt += inner.fmtstr
        elif isinstance(inner, Bytes) and isinstance(inner.length, int):
            fmt += f"{inner.length}s"
        else:
            raise TypeError(f"field {sc.name} of kind {type(inner).__name__} has no fixed struct form")
        names.append(sc.name)
    st = struct.Struct(fmt)
    if st.size != cs.sizeof():
        raise AssertionError(f"derived format {fmt} is {st.size} bytes, construct says {cs.sizeof()}")
    return st, tuple(names)


INODE_BASE_ST, INODE_BASE_FIELDS = fixed_struct(inode_base)
INODE_LARGE_ST, INODE_LARGE_FIELDS = fixed_struct(inode_large)
GROUP_DESC32_ST, GROUP_DESC32_FIELDS = fixed_struct(group_desc32)
GROUP_DESC64_ST, GROUP_DESC64_FIELDS = fixed_struct(group_desc64)
DIR_HEAD_ST, _ = fixed_struct(dir_entry_head)
DIR_HEAD_NOFT_ST, _ = fixed_struct(dir_entry_head_nofiletype)
EXTENT_HEADER_ST, _ = fixed_struct(extent_header)
EXTENT_IDX_ST, _ = fixed_struct(extent_idx)
EXTENT_LEAF_ST, _ = fixed_struct(extent_leaf)
XATTR_ENTRY_ST, _ = fixed_struct(xattr_entry_head)
DX_ROOT_INFO_ST, _ = fixed_struct(dx_root_info)


def numpy_dtype(cs: Struct, itemsize: int | None = None):  # noqa: ANN201 - numpy is imported only when asked
    """A numpy structured dtype of the same fields as `fixed_struct(cs)` (numpy is imported here, not at import
    time: only the bulk index needs it), padded to `itemsize` (an inode record longer than the declared part).
    Byte strings become (uint8, n) sub-arrays."""
    import numpy as np

    st, names = fixed_struct(cs)
    codes = {"B": "u1", "H": "<u2", "I": "<u4", "L": "<u4", "Q": "<u8", "b": "i1", "h": "<i2", "i": "<i4", "l": "<i4",
             "q": "<i8"}
    formats, offsets, pos = [], [], 0
    for code in struct_codes(st.format):
        if code.endswith("s"):
            formats.append(("u1", int(code[:-1])))
        else:
            formats.append(codes[code])
        offsets.append(pos)
        pos += struct.calcsize("<" + code)
    dt = np.dtype({"names": list(names), "formats": formats, "offsets": offsets,
                   "itemsize": itemsize if itemsize is not None else st.size})
    if pos != st.size or len(formats) != len(names) or dt.itemsize < st.size:
        raise AssertionError(f"numpy dtype of {names[0]}...: {pos} bytes, struct says {st.size}")
    return dt


def struct_codes(fmt: str) -> list[str]:
    """The field codes of a '<'-prefixed struct format without repeat counts but for byte strings ('60s')."""
    out, count = [], ""
    for ch in fmt.lstrip("<"):
        if ch.isdigit():
            count += ch
        else:
            out.append(count + ch if ch == "s" else ch)
            if ch != "s" and count:
                raise TypeError(f"repeat count in {fmt}")
            count = ""
    return out

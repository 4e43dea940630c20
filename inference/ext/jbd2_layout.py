"""On-disk jbd2 structures (names follow the kernel's include/linux/jbd2.h). Everything is big-endian.

The construct declarations are the source of truth; the tracker's per-block paths use `struct.Struct` formats derived
from them by `fixed_struct_be`, so the layout is written once. Tag size depends on the journal's features
(`tag_bytes`), so tags are declared as the widest form and parsed through the size-specific formats below.
"""

from __future__ import annotations

import struct

from construct import Array, Bytes, Const, FormatField, Int8ub, Int16ub, Int32ub, Int64ub, Struct

JBD2_MAGIC = 0xC03B3998

# h_blocktype
DESCRIPTOR_BLOCK, COMMIT_BLOCK, SUPERBLOCK_V1, SUPERBLOCK_V2, REVOKE_BLOCK = 1, 2, 3, 4, 5

# s_feature_compat / s_feature_incompat
COMPAT_CHECKSUM = 0x1  # v1 transaction checksum in the commit block (crc32_be); superseded by v2/v3
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_ASYNC_COMMIT = 0x1, 0x2, 0x4
INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3, INCOMPAT_FAST_COMMIT = 0x8, 0x10, 0x20

# t_flags
FLAG_ESCAPE, FLAG_SAME_UUID, FLAG_DELETED, FLAG_LAST_TAG = 1, 2, 4, 8

CRC32C_CHKSUM = 4  # s_checksum_type for v2/v3
DEFAULT_FAST_COMMIT_BLOCKS = 256  # used when s_num_fc_blks is 0 and FAST_COMMIT is set

header = Struct("h_magic" / Int32ub, "h_blocktype" / Int32ub, "h_sequence" / Int32ub)

superblock = Struct(  # 1024 bytes at the start of journal block 0
    "s_header" / header,
    "s_blocksize" / Int32ub, "s_maxlen" / Int32ub, "s_first" / Int32ub,
    "s_sequence" / Int32ub, "s_start" / Int32ub, "s_errno" / Int32ub,
    # the rest is meaningful only in a v2 superblock (h_blocktype 4)
    "s_feature_compat" / Int32ub, "s_feature_incompat" / Int32ub, "s_feature_ro_compat" / Int32ub,
    "s_uuid" / Bytes(16), "s_nr_users" / Int32ub, "s_dynsuper" / Int32ub,
    "s_max_transaction" / Int32ub, "s_max_trans_data" / Int32ub,
    "s_checksum_type" / Int8ub, "s_padding2" / Bytes(3), "s_num_fc_blks" / Int32ub,
    "s_head" / Int32ub,  # kernel >= 6.4: head of the log, valid only while the journal is clean
    "s_padding" / Bytes(160), "s_checksum" / Int32ub, "s_users" / Bytes(16 * 48),
)

block_tag3 = Struct(  # CSUM_V3: always 16 bytes
    "t_blocknr" / Int32ub, "t_flags" / Int32ub, "t_blocknr_high" / Int32ub, "t_checksum" / Int32ub,
)

block_tag = Struct(  # no checksum or CSUM_V2: 12 bytes with 64BIT, 8 without; CSUM_V2 appends 2 bytes (kernel quirk)
    "t_blocknr" / Int32ub, "t_checksum" / Int16ub, "t_flags" / Int16ub, "t_blocknr_high" / Int32ub,
)

block_tail = Struct("t_checksum" / Int32ub)  # last 4 bytes of a descriptor or revoke block with CSUM_V2/V3

commit_header = Struct(
    "h_magic" / Const(JBD2_MAGIC, Int32ub), "h_blocktype" / Int32ub, "h_sequence" / Int32ub,
    "h_chksum_type" / Int8ub, "h_chksum_size" / Int8ub, "h_padding" / Bytes(2),
    "h_chksum" / Array(8, Int32ub), "h_commit_sec" / Int64ub, "h_commit_nsec" / Int32ub,
)

revoke_header = Struct("r_header" / header, "r_count" / Int32ub)  # r_count: bytes used, header included
REVOKE_RECORD32, REVOKE_RECORD64 = Int32ub, Int64ub  # records are 8 bytes with 64BIT


def fixed_struct_be(cs: Struct) -> struct.Struct:
    """A big-endian struct.Struct equal to a construct Struct of fixed-size fields (flattening nested Structs)."""
    fmt = ">"

    def walk(s: Struct) -> None:
        nonlocal fmt
        for sc in s.subcons:
            inner = sc.subcon if hasattr(sc, "subcon") else sc
            if isinstance(inner, Const):
                inner = inner.subcon
            if isinstance(inner, Struct):
                walk(inner)
            elif isinstance(inner, FormatField) and inner.fmtstr[0] == ">":
                fmt += inner.fmtstr[1:]
            elif isinstance(inner, FormatField) and len(inner.fmtstr) == 1:
                fmt += inner.fmtstr
            elif isinstance(inner, Bytes) and isinstance(inner.length, int):
                fmt += f"{inner.length}s"
            elif isinstance(inner, Array) and isinstance(inner.count, int) and isinstance(inner.subcon, FormatField):
                fmt += f"{inner.count}{inner.subcon.fmtstr[1:]}"
            else:
                raise TypeError(f"field {sc.name} of kind {type(inner).__name__} has no fixed struct form")

    walk(cs)
    st = struct.Struct(fmt)
    if st.size != cs.sizeof():
        raise AssertionError(f"derived format {fmt} is {st.size} bytes, construct says {cs.sizeof()}")
    return st


HEADER_ST = fixed_struct_be(header)  # (magic, blocktype, sequence)
SUPERBLOCK_ST = fixed_struct_be(superblock)
TAG3_ST = fixed_struct_be(block_tag3)  # (blocknr, flags, blocknr_high, checksum)
TAG_ST = fixed_struct_be(block_tag)  # (blocknr, checksum16, flags, blocknr_high)
TAG_ST32 = struct.Struct(">IHH")  # block_tag without t_blocknr_high (no 64BIT)
COMMIT_ST = fixed_struct_be(commit_header)
REVOKE_ST = fixed_struct_be(revoke_header)  # (magic, blocktype, sequence, r_count)
TAIL_SIZE = block_tail.sizeof()
UUID_SIZE = 16
SB_CHECKSUM_OFFSET = SUPERBLOCK_ST.size - 16 * 48 - 4  # 0xFC
COMMIT_CHKSUM_OFFSET = 16  # h_chksum[0]
assert SUPERBLOCK_ST.size == 1024 and SB_CHECKSUM_OFFSET == 0xFC and COMMIT_ST.size == 60


def tag_bytes(incompat: int) -> int:
    """Bytes per block tag, as the kernel's journal_tag_bytes: v3 is 16; otherwise 12 (64BIT) or 8, +2 with v2."""
    if incompat & INCOMPAT_CSUM_V3:
        return TAG3_ST.size
    size = TAG_ST.size + (2 if incompat & INCOMPAT_CSUM_V2 else 0)
    return size if incompat & INCOMPAT_64BIT else size - 4

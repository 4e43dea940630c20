"""GPT: primary header at LBA 1, backup at the last LBA, each with a CRC32 over itself and over its entry array.

A table whose header or entries CRC fails is ignored (reported), and the other copy is used: the guest firmware and
Linux do the same, so we see the partitions the guest sees. Partitions are named pN by entry index, as Linux does.
"""

from __future__ import annotations

import uuid
import zlib

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from inference.volume.layout import SECTOR, RawPart, Reader, TableScan

GptHeader = Struct(
    "signature" / Const(b"EFI PART"),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,  # over header_size bytes with this field zeroed
    "reserved" / Int32ul,
    "my_lba" / Int64ul,
    "alternate_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "entries_lba" / Int64ul,
    "num_entries" / Int32ul,
    "entry_size" / Int32ul,
    "entries_crc32" / Int32ul,
)
GptEntry = Struct(
    "type_guid" / Bytes(16),
    "unique_guid" / Bytes(16),
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,  # inclusive
    "attributes" / Int64ul,
    "name" / Bytes(72),  # UTF-16LE, NUL padded
)

MAX_ENTRIES = 1024
MAX_ENTRY_SIZE = 1024  # UEFI: 128 * 2**n; Linux accepts only 128. Bounds the entry array to 1 MiB
HEADER_MIN, HEADER_MAX = 92, SECTOR
DEFAULT_ENTRY_SECTORS = 32  # 128 entries of 128 bytes: where a fresh table would go


def regions(disk_size: int) -> list[tuple[int, int]]:
    """Where the two copies sit by default: found tables add their actual entry arrays to this."""
    last = (disk_size // SECTOR - 1) * SECTOR
    return [(0, SECTOR), (SECTOR, (1 + DEFAULT_ENTRY_SECTORS) * SECTOR),
            (last - DEFAULT_ENTRY_SECTORS * SECTOR, (DEFAULT_ENTRY_SECTORS + 1) * SECTOR)]


def _header(rd: Reader, lba: int, which: str) -> tuple | None:
    """A CRC-checked header at `lba` and its CRC-checked entry array, or None with the reason in rd.errors."""
    raw = rd(lba * SECTOR, SECTOR)
    if raw[:8] != b"EFI PART":
        rd.errors.append(f"gpt: no {which} header at LBA {lba}")
        return None
    h = GptHeader.parse(raw)
    if not HEADER_MIN <= h.header_size <= HEADER_MAX:
        rd.errors.append(f"gpt: {which} header size {h.header_size} is insane")
        return None
    check = bytearray(raw[: h.header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != h.header_crc32:
        rd.errors.append(f"gpt: {which} header CRC mismatch")
        return None
    if h.my_lba != lba:
        rd.errors.append(f"gpt: {which} header says it is at LBA {h.my_lba}, found at {lba}")
        return None
    es = h.entry_size
    if not (0 < h.num_entries <= MAX_ENTRIES and 128 <= es <= MAX_ENTRY_SIZE and es & (es - 1) == 0):
        rd.errors.append(f"gpt: {which} entry array {h.num_entries}x{h.entry_size} is insane")
        return None
    start, length = h.entries_lba * SECTOR, h.num_entries * h.entry_size
    if h.entries_lba < 2 or not rd.fits(start, length):
        rd.errors.append(f"gpt: {which} entry array at LBA {h.entries_lba} is outside the disk")
        return None
    table = rd(start, length)
    if zlib.crc32(table) != h.entries_crc32:
        rd.errors.append(f"gpt: {which} entries CRC mismatch")
        return None
    return h, table


def scan(rd: Reader) -> TableScan:
    """Partitions from the primary GPT, or from the backup when the primary fails its checks."""
    out = TableScan("gpt", regions=regions(rd.disk_size))
    last_lba = rd.disk_size // SECTOR - 1
    found = _header(rd, 1, "primary") if last_lba > 2 else None
    if found is None and last_lba > 2:
        found = _header(rd, last_lba, "backup")
        if found is not None:
            rd.errors.append("gpt: using the backup table")
    if found is None:
        return out
    h, table = found
    out.regions.append((h.entries_lba * SECTOR, h.num_entries * h.entry_size))
    alt = h.alternate_lba
    if 0 < alt <= last_lba and alt != h.my_lba:
        out.regions.append((alt * SECTOR, SECTOR))
        other = _header(Reader(rd.read, rd.disk_size, quiet := []), alt, "alternate")
        if other is not None:
            out.regions.append((other[0].entries_lba * SECTOR, other[0].num_entries * other[0].entry_size))
        elif h.my_lba == 1:
            rd.errors.append(f"gpt: the backup table is invalid ({'; '.join(quiet)})")
    for i in range(h.num_entries):
        raw = table[i * h.entry_size: i * h.entry_size + 128]
        if raw[:16] == bytes(16):
            continue  # unused entry (checked before parsing: most of a 128-entry table is empty)
        e = GptEntry.parse(raw)
        if not (0 < e.first_lba <= e.last_lba <= last_lba):
            rd.errors.append(f"gpt: entry {i + 1} spans LBA {e.first_lba}..{e.last_lba}, outside the disk")
            continue
        name = e.name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        out.parts.append(RawPart(i + 1, e.first_lba * SECTOR, (e.last_lba - e.first_lba + 1) * SECTOR,
                                 label=name, uuid=str(uuid.UUID(bytes_le=e.unique_guid))))
    return out

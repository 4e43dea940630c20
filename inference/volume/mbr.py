"""MBR (DOS) partition tables: four primaries, and the linked list of EBRs inside an extended partition.

Numbering follows Linux (block/partitions/msdos.c): primaries are p1..p4 by slot, logicals p5, p6, ... in chain order,
so our names match /dev/vdaN in the guest and `sfdisk --json`.
"""

from __future__ import annotations

from construct import Array, Bytes, Const, Int8ul, Int32ul, Struct

from inference.volume.layout import SECTOR, RawPart, Reader, TableScan

MbrEntry = Struct(
    "status" / Int8ul,  # 0x00 or 0x80; anything else means this sector is not a partition table
    "chs_first" / Bytes(3),
    "type" / Int8ul,
    "chs_last" / Bytes(3),
    "lba_start" / Int32ul,  # relative to the disk (primary), the EBR (logical) or the extended start (link)
    "sectors" / Int32ul,
)
Mbr = Struct(
    "boot" / Bytes(440),
    "disk_signature" / Int32ul,
    "reserved" / Bytes(2),
    "entries" / Array(4, MbrEntry),
    "signature" / Const(b"\x55\xaa"),
)

EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
GPT_PROTECTIVE = 0xEE
MAX_LOGICAL = 128  # EBR chain bound: a guest can link EBRs into a cycle or an endless list


def parse_sector(sector: bytes) -> list | None:
    """The four entries of a sector that looks like a partition table, or None (no 0x55AA, bad status bytes)."""
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        return None
    entries = Mbr.parse(sector[:SECTOR]).entries
    if any(e.status not in (0, 0x80) for e in entries):
        return None
    return list(entries)


def is_protective(entries: list) -> bool:
    return any(e.type == GPT_PROTECTIVE for e in entries)


def scan(rd: Reader, entries: list) -> TableScan:
    """Primaries and logicals of a DOS table whose sector 0 parsed to `entries`; bad entries go to rd.errors."""
    out = TableScan("dos", regions=[(0, SECTOR)])
    extended: list[RawPart] = []
    for slot, e in enumerate(entries, 1):
        if e.type == 0 or e.sectors == 0:
            continue
        part = _bounded(rd, slot, e.lba_start * SECTOR, e.sectors * SECTOR)
        if part is None:
            continue
        part.container = e.type in EXTENDED_TYPES
        out.parts.append(part)
        if part.container:
            extended.append(part)
    number = 5
    for ext in extended:
        number = _logicals(rd, ext, number, out)
    return out


def _bounded(rd: Reader, number: int, start: int, size: int) -> RawPart | None:
    """A partition clipped to the disk, as Linux does; one starting past the end is dropped."""
    if start >= rd.disk_size or start <= 0:
        rd.errors.append(f"mbr: p{number} starts at {start}, outside the disk ({rd.disk_size})")
        return None
    if start + size > rd.disk_size:
        rd.errors.append(f"mbr: p{number} ends past the disk end; clipped")
        size = rd.disk_size - start
    return RawPart(number, start, size)


def _logicals(rd: Reader, ext: RawPart, number: int, out: TableScan) -> int:
    """Walk the EBR chain of one extended partition (Linux parse_extended), bounded and loop-safe."""
    first, this, this_size = ext.start, ext.start, ext.size
    seen: set[int] = set()
    for _ in range(MAX_LOGICAL):
        if this in seen:
            rd.errors.append(f"mbr: EBR chain loops at {this}")
            break
        seen.add(this)
        if not rd.fits(this, SECTOR) or not (first <= this < first + ext.size):
            rd.errors.append(f"mbr: EBR at {this} is outside the extended partition")
            break
        out.regions.append((this, SECTOR))
        entries = parse_sector(rd(this, SECTOR))
        if entries is None:
            break
        for i, e in enumerate(entries):
            if e.sectors == 0 or e.type in EXTENDED_TYPES:
                continue
            offs, size = e.lba_start * SECTOR, e.sectors * SECTOR
            start = this + offs
            if i >= 2 and (offs + size > this_size or start + size > first + ext.size):
                continue  # Linux: slots 3 and 4 of an EBR often hold garbage
            part = _bounded(rd, number, start, size)
            if part is not None:
                out.parts.append(part)
                number += 1
        link = next((e for e in entries if e.sectors and e.type in EXTENDED_TYPES), None)
        if link is None:
            break
        this, this_size = first + link.lba_start * SECTOR, link.sectors * SECTOR
    else:
        rd.errors.append(f"mbr: more than {MAX_LOGICAL} logical partitions; rest ignored")
    return number

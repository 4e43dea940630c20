"""The volume map: which file system (if any) a whole-disk write lands in, and at which offset inside it.

`scan()` parses the layout (MBR/EBR chain or GPT, then LVM2 PVs on partitions or on the whole disk) from the replica;
`locate()` then answers per write with a bisect over precomputed disjoint intervals. The layout itself can change
while the VM runs, so `is_layout_write()` tells the engine which writes touch it; the engine re-scans after those
and diffs the volume lists. Layout writes are still routed through `locate()` like any other write.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from inference.errors import CorruptMetadata
from inference.volume import gpt, lvm, mbr
from inference.volume.layout import SECTOR, RawPart, Reader, TableScan

EXT_MAGIC_AT, EXT_MAGIC = 1024 + 56, b"\x53\xef"
SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")
PAGE = 4096  # x86 guests: the swap signature ends the first page
SIGNATURE_SPAN = PAGE  # ext superblock, swap signature and LVM label all live in a volume's first 4 KiB
CONTAINER_KINDS = frozenset({"extended", "lvm-pv"})  # their bytes belong to the volumes inside them


@dataclass(frozen=True, slots=True)
class Volume:
    """A partition, LV or whole disk; `segments` are (disk_offset, volume_offset, length), sorted by volume offset."""

    name: str
    label: str
    uuid: str
    kind: str  # ext | swap | lvm-pv | extended | unsupported | unknown
    size: int
    segments: tuple[tuple[int, int, int], ...]


class VolumeMap:
    """Volumes of one disk, from a `read(offset, length)` over its current bytes. Sans-I/O: it never opens a file."""

    def __init__(self, read: Callable[[int, int], bytes], disk_size: int) -> None:
        self._raw_read = read
        self.disk_size = disk_size
        self.volumes: list[Volume] = []
        self.errors: list[str] = []
        self.table = ""  # "dos", "gpt" or "" (no partition table)
        self._starts: list[int] = []  # disjoint intervals of leaf volumes, for locate()
        self._ivals: list[tuple[int, int, Volume, int]] = []  # (start, end, volume, disk - volume offset)
        self._layout: list[tuple[int, int]] = []  # merged (start, end) of layout metadata
        self._layout_starts: list[int] = []

    # ------------------------------------------------------------ scanning

    def scan(self) -> list[Volume]:
        """Parse the layout again from the disk's current bytes; replaces `volumes` and `errors`."""
        errors: list[str] = []
        if self.disk_size < SECTOR:
            raise CorruptMetadata(f"disk of {self.disk_size} bytes has no sector 0")
        rd = Reader(self._raw_read, self.disk_size, errors)
        try:
            sector0 = bytes(self._raw_read(0, SECTOR))
        except (OSError, ValueError) as e:
            raise CorruptMetadata(f"sector 0 is unreadable: {e}") from e
        entries = mbr.parse_sector(sector0)
        if entries is None:
            found = TableScan("", regions=[(0, 2 * SECTOR)])  # where an MBR or a GPT header would appear
        elif mbr.is_protective(entries):
            found = gpt.scan(rd)
        else:
            found = mbr.scan(rd, entries)
        volumes: list[Volume] = []
        layout = list(found.regions)
        pvs: list[lvm.Pv] = []
        parts = found.parts if found.kind else [RawPart(0, 0, self.disk_size)]
        for p in sorted(parts, key=lambda p: p.number):
            name = f"p{p.number}" if found.kind else "disk"
            kind = "extended" if p.container else _sniff(rd, p.start, p.size)
            if kind == "lvm-pv":
                pv = lvm.scan_pv(rd, p.start, p.size)
                if pv is not None:
                    pvs.append(pv)
                    layout.extend(pv.regions)
            if not p.container:
                layout.append((p.start, min(SIGNATURE_SPAN, p.size)))  # mkfs/mkswap/pvcreate change the kind
            volumes.append(Volume(name, p.label, p.uuid, kind, p.size, ((p.start, 0, p.size),)))
        for lv in lvm.logical_volumes(rd, pvs):
            kind = _sniff_segments(rd, lv.segments, lv.size) if lv.supported else "unsupported"
            volumes.append(Volume(lv.name, lv.label, lv.uuid, kind, lv.size, lv.segments))
            layout.extend((d, min(length, SIGNATURE_SPAN - v)) for d, v, length in lv.segments if v < SIGNATURE_SPAN)
        self._index(volumes, layout, errors)
        self.table, self.volumes, self.errors = found.kind, volumes, errors
        return volumes

    def _index(self, volumes: list[Volume], layout: list[tuple[int, int]], errors: list[str]) -> None:
        """Sort the leaf volumes' segments for bisect; a segment overlapping an earlier one is dropped (hostile)."""
        segs = sorted(((d, d + n, v, d - o) for v in volumes if v.kind not in CONTAINER_KINDS
                       for d, o, n in v.segments if n > 0), key=lambda s: (s[0], s[1]))
        ivals: list[tuple[int, int, Volume, int]] = []
        for seg in segs:
            if ivals and seg[0] < ivals[-1][1]:
                errors.append(f"{seg[2].name} overlaps {ivals[-1][2].name} at {seg[0]}; its writes go to the first")
                continue
            ivals.append(seg)
        self._ivals, self._starts = ivals, [a for a, *_ in ivals]
        merged: list[tuple[int, int]] = []
        for s, e in sorted((s, s + n) for s, n in layout if n > 0):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self._layout, self._layout_starts = merged, [s for s, _ in merged]

    # ------------------------------------------------------------ per write

    def locate(self, disk_offset: int, length: int) -> list[tuple[Volume, int, int, int]]:
        """Pieces (volume, volume_offset, piece_disk_offset, piece_length) of a write; [] outside every volume."""
        if length <= 0:
            return []
        end = disk_offset + length
        ivals = self._ivals
        i = bisect.bisect_right(self._starts, disk_offset) - 1
        if i >= 0:
            a, b, vol, delta = ivals[i]
            if end <= b:  # the common case: the whole write inside one segment
                return [(vol, disk_offset - delta, disk_offset, length)]
        else:
            i = 0
        out: list[tuple[Volume, int, int, int]] = []
        while i < len(ivals):
            a, b, vol, delta = ivals[i]
            if a >= end:
                break
            if b > disk_offset:
                s, e = max(a, disk_offset), min(b, end)
                last = out[-1] if out else None
                if last is not None and last[0] is vol and last[2] + last[3] == s and last[1] + last[3] == s - delta:
                    out[-1] = (vol, last[1], last[2], last[3] + e - s)
                else:
                    out.append((vol, s - delta, s, e - s))
            i += 1
        return out

    def is_layout_write(self, disk_offset: int, length: int) -> bool:
        """True if the write touches a partition table, an LVM label or metadata area, or a volume's signature."""
        i = bisect.bisect_right(self._layout_starts, disk_offset + length - 1) - 1
        return i >= 0 and self._layout[i][1] > disk_offset

    def layout_regions(self) -> list[tuple[int, int]]:
        """The merged (start, end) byte ranges `is_layout_write` checks against."""
        return list(self._layout)


def _sniff(rd: Reader, start: int, size: int) -> str:
    """What a volume holds, by signature: an LVM label first (pvcreate wipes older signatures), then ext, swap."""
    if size >= 4 * SECTOR and lvm.find_label(rd, start) is not None:
        return "lvm-pv"
    return _kind(rd(start, min(size, PAGE)))


def _kind(head: bytes) -> str:
    if len(head) >= EXT_MAGIC_AT + 2 and head[EXT_MAGIC_AT: EXT_MAGIC_AT + 2] == EXT_MAGIC:
        return "ext"
    if len(head) >= PAGE and head[PAGE - 10: PAGE] in SWAP_MAGICS:
        return "swap"
    return "unknown"


def _sniff_segments(rd: Reader, segments: tuple[tuple[int, int, int], ...], size: int) -> str:
    """Kind of an LV: read its first page through the mapping (it may start in a short segment)."""
    head = bytearray(min(size, PAGE))
    for disk, vol, length in segments:
        if vol < len(head):
            n = min(length, len(head) - vol)
            head[vol: vol + n] = rd(disk, n)
    return _kind(bytes(head))

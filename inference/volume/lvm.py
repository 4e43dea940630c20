"""LVM2 physical volumes: the label, the pv_header, the metadata area ring buffer, and the VG text metadata.

Layouts follow lvm2 lib/format_text/layout.h and lib/label/label.h. Only linear LVs are mapped (a "striped" segment
with stripe_count 1, which is how lvm2 writes linear); striped/mirror/raid/thin LVs are reported as unsupported, so
their writes are never attributed to a file system we would then misread.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

from construct import Bytes, Int32ul, Int64ul, Struct

from inference.volume.layout import SECTOR, Reader

LabelHeader = Struct(
    "id" / Bytes(8),  # "LABELONE"
    "sector" / Int64ul,  # the sector this label is in (0..3)
    "crc" / Int32ul,  # lvm CRC over the rest of the sector, from offset 20
    "offset" / Int32ul,  # where the pv_header starts, from the label sector start
    "type" / Bytes(8),  # "LVM2 001"
)
DiskLocn = Struct("offset" / Int64ul, "size" / Int64ul)  # lists end with offset 0
PvHeader = Struct("uuid" / Bytes(32), "device_size" / Int64ul)
MdaHeader = Struct(
    "checksum" / Int32ul,  # lvm CRC over bytes 4..512
    "magic" / Bytes(16),
    "version" / Int32ul,
    "start" / Int64ul,  # the metadata area's own offset on the PV
    "size" / Int64ul,
)
RawLocn = Struct("offset" / Int64ul, "size" / Int64ul, "checksum" / Int32ul, "flags" / Int32ul)

LABEL_ID, LABEL_TYPE = b"LABELONE", b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
LABEL_SCAN_SECTORS = 4
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 1
MAX_LOCNS = 8
MAX_TEXT = 1 << 20
MAX_DEPTH = 16


def lvm_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """lvm2's calc_crc: the reflected CRC-32 with its own seed and no final inversion, via zlib's inverted one."""
    return ~zlib.crc32(data, ~initial & 0xFFFFFFFF) & 0xFFFFFFFF


# ---------------------------------------------------------------- the config text format

class ConfigError(ValueError):
    pass


_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<s>"(?:[^"\\]|\\.)*")|(?P<w>[A-Za-z0-9_.+\-/:@]+)|(?P<p>[{}\[\]=,])', re.S)
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?\d+\.\d*")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigError(f"unexpected {text[pos]!r} at {pos}")
        pos = m.end()
        if m.lastgroup:
            out.append((m.lastgroup, m.group(m.lastgroup)))
    return out


def parse_config(text: str) -> dict:
    """LVM's config grammar: `name { ... }` sections, `key = value`, values strings, numbers or [arrays]."""
    toks = _tokens(text)
    pos = 0

    def take() -> tuple[str, str]:
        nonlocal pos
        if pos >= len(toks):
            raise ConfigError("unexpected end of text")
        pos += 1
        return toks[pos - 1]

    def scalar(kind: str, tok: str) -> object:
        if kind == "s":
            return re.sub(r"\\(.)", r"\1", tok[1:-1], flags=re.S)
        if kind == "w" and _INT.fullmatch(tok):
            return int(tok)
        if kind == "w" and _FLOAT.fullmatch(tok):
            return float(tok)
        if kind == "w":
            return tok
        raise ConfigError(f"unexpected {tok!r}")

    def value() -> object:
        kind, tok = take()
        if tok != "[" or kind != "p":
            return scalar(kind, tok)
        items: list[object] = []
        while True:
            kind, tok = take()
            if kind == "p" and tok == "]":
                return items
            if kind == "p" and tok == ",":
                continue
            items.append(scalar(kind, tok))

    def section(depth: int, closed: bool) -> dict:
        if depth > MAX_DEPTH:
            raise ConfigError("sections nested too deep")
        d: dict[str, object] = {}
        while True:
            if pos >= len(toks) and not closed:
                return d
            kind, name = take()
            if kind == "p" and name == "}" and closed:
                return d
            if kind != "w":
                raise ConfigError(f"expected a name, got {name!r}")
            kind, tok = take()
            if (kind, tok) == ("p", "="):
                d[name] = value()
            elif (kind, tok) == ("p", "{"):
                d[name] = section(depth + 1, True)
            else:
                raise ConfigError(f"expected = or {{ after {name!r}")

    return section(0, False)


# ---------------------------------------------------------------- physical volumes

@dataclass(slots=True)
class Pv:
    """One PV label found on the disk: where it lives, which byte ranges are LVM metadata, and its VG text."""

    uuid: str  # 32 characters, no dashes (as in the pv_header)
    base: int  # disk offset of the PV (its partition's start, or 0)
    size: int
    regions: list[tuple[int, int]] = field(default_factory=list)
    vg_name: str = ""
    vg: dict | None = None  # the VG section of the newest metadata found on this PV


def find_label(rd: Reader, base: int) -> tuple[int, bytes] | None:
    """The sector index and bytes of a CRC-valid LVM2 label in the first four sectors at `base`."""
    for i in range(LABEL_SCAN_SECTORS):
        sector = rd(base + i * SECTOR, SECTOR)
        if sector[:8] != LABEL_ID:
            continue
        h = LabelHeader.parse(sector)
        if h.sector == i and h.type == LABEL_TYPE and lvm_crc(sector[20:]) == h.crc and 32 <= h.offset <= 256:
            return i, sector
    return None


def _locns(buf: bytes, pos: int) -> tuple[list[tuple[int, int]], int]:
    out: list[tuple[int, int]] = []
    while pos + 16 <= len(buf) and len(out) < MAX_LOCNS:
        d = DiskLocn.parse(buf[pos: pos + 16])
        pos += 16
        if d.offset == 0:
            break
        out.append((d.offset, d.size))
    return out, pos


def scan_pv(rd: Reader, base: int, size: int) -> Pv | None:
    """Parse a PV at disk offset `base`: label, pv_header, metadata areas and the newest VG text among them."""
    found = find_label(rd, base)
    if found is None:
        return None
    _, sector = found
    off = LabelHeader.parse(sector).offset
    h = PvHeader.parse(sector[off:])
    _, pos = _locns(sector, off + 40)  # data areas: the PE area is described by pe_start in the text instead
    mdas, _ = _locns(sector, pos)
    pv = Pv(h.uuid.decode("ascii", "replace"), base, size, regions=[(base, LABEL_SCAN_SECTORS * SECTOR)])
    best = -1
    for mda_off, mda_size in mdas:
        if not (MDA_HEADER_SIZE < mda_size and mda_off + mda_size <= size and rd.fits(base + mda_off, mda_size)):
            rd.errors.append(f"lvm: PV {pv.uuid} metadata area {mda_off}+{mda_size} is outside the PV")
            continue
        pv.regions.append((base + mda_off, mda_size))
        got = _metadata(rd, base + mda_off, mda_off, mda_size)
        if got is None:
            continue
        try:
            meta = parse_config(got)
        except ConfigError as e:
            rd.errors.append(f"lvm: PV {pv.uuid} metadata does not parse: {e}")
            continue
        vgs = [(k, v) for k, v in meta.items() if isinstance(v, dict)]
        if len(vgs) != 1:
            rd.errors.append(f"lvm: PV {pv.uuid} metadata holds {len(vgs)} VG sections")
            continue
        seqno = vgs[0][1].get("seqno")
        if isinstance(seqno, int) and seqno > best:
            best, (pv.vg_name, pv.vg) = seqno, vgs[0]
    return pv


def _metadata(rd: Reader, at: int, mda_off: int, mda_size: int) -> str | None:
    """The committed text of one metadata area (a ring buffer after its 512-byte header), checksums checked."""
    raw = rd(at, MDA_HEADER_SIZE)
    h = MdaHeader.parse(raw)
    if h.magic != MDA_MAGIC or h.version != 1 or lvm_crc(raw[4:]) != h.checksum:
        rd.errors.append(f"lvm: bad metadata area header at {at}")
        return None
    if h.start != mda_off or h.size != mda_size:
        rd.errors.append(f"lvm: metadata area header at {at} describes another area")
        return None
    loc = RawLocn.parse(raw[40:64])
    if loc.offset == 0 or loc.flags & RAW_LOCN_IGNORED:
        return None
    if not (MDA_HEADER_SIZE <= loc.offset < mda_size and 0 < loc.size <= min(MAX_TEXT, mda_size - MDA_HEADER_SIZE)):
        rd.errors.append(f"lvm: metadata text {loc.offset}+{loc.size} at {at} is out of bounds")
        return None
    first = min(loc.size, mda_size - loc.offset)  # the text wraps to just after the header
    text = rd(at + loc.offset, first) + rd(at + MDA_HEADER_SIZE, loc.size - first)
    if lvm_crc(text) != loc.checksum:
        rd.errors.append(f"lvm: metadata text checksum mismatch at {at}")
        return None
    return text.rstrip(b"\0").decode("utf-8", "replace")


# ---------------------------------------------------------------- logical volumes

@dataclass(frozen=True, slots=True)
class Lv:
    name: str  # "VG/LV"
    label: str
    uuid: str
    size: int
    segments: tuple[tuple[int, int, int], ...]  # (disk offset, LV offset, length)
    supported: bool


def _int(d: dict, key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = d.get(key)
    if not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{key} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def logical_volumes(rd: Reader, pvs: list[Pv]) -> list[Lv]:
    """Map every visible LV of every VG with a PV on this disk; the newest metadata (highest seqno) wins."""
    vgs: dict[str, tuple[str, dict]] = {}
    for pv in pvs:
        if pv.vg is None:
            continue
        key = str(pv.vg.get("id", pv.vg_name))
        old = vgs.get(key)
        if old is None or _int(old[1], "seqno") < _int(pv.vg, "seqno"):
            vgs[key] = (pv.vg_name, pv.vg)
    local = {pv.uuid: pv for pv in pvs}
    out: list[Lv] = []
    for vg_name, vg in sorted(vgs.values(), key=lambda x: x[0]):
        try:
            out.extend(_vg_lvs(rd, vg_name, vg, local))
        except ConfigError as e:
            rd.errors.append(f"lvm: VG {vg_name}: {e}")
    return out


def _vg_lvs(rd: Reader, vg_name: str, vg: dict, local: dict[str, Pv]) -> list[Lv]:
    extent = _int(vg, "extent_size", 1, 1 << 32) * SECTOR
    pvmap: dict[str, tuple[Pv, int, int]] = {}  # "pv0" -> (this disk's PV, pe_start bytes, pe_count)
    pvs = vg.get("physical_volumes")
    for key, p in (pvs.items() if isinstance(pvs, dict) else ()):
        if isinstance(p, dict) and str(p.get("id", "")).replace("-", "") in local:
            pvmap[key] = (local[str(p["id"]).replace("-", "")], _int(p, "pe_start") * SECTOR, _int(p, "pe_count"))
    lvs = vg.get("logical_volumes")
    out = []
    for lv_name, lv in sorted(lvs.items() if isinstance(lvs, dict) else ()):
        if not isinstance(lv, dict) or "VISIBLE" not in (lv.get("status") or ()):
            continue  # hidden sub-LVs (mirror images, thin pool data) belong to an LV we do not map
        try:
            out.append(_lv(rd, vg_name, lv_name, lv, extent, pvmap))
        except ConfigError as e:  # one bad LV must not hide the others
            rd.errors.append(f"lvm: {vg_name}/{lv_name}: {e}")
    return out


def _lv(rd: Reader, vg_name: str, lv_name: str, lv: dict, extent: int, pvmap: dict[str, tuple[Pv, int, int]]) -> Lv:
    segs, size, supported = [], 0, True
    for key, seg in lv.items():
        if not (key.startswith("segment") and isinstance(seg, dict)):
            continue
        start, count = _int(seg, "start_extent") * extent, _int(seg, "extent_count", 1) * extent
        size = max(size, start + count)
        stripes = seg.get("stripes")
        linear = seg.get("type") in ("striped", "linear") and seg.get("stripe_count", 1) == 1
        if not (linear and isinstance(stripes, list) and len(stripes) == 2 and isinstance(stripes[1], int)):
            supported = False
            continue
        where = pvmap.get(str(stripes[0]))
        if where is None:
            continue  # on a PV of another disk
        pv, pe_start, pe_count = where
        pe = stripes[1]
        disk = pv.base + pe_start + pe * extent
        if pe < 0 or pe * extent + count > pe_count * extent or disk + count > pv.base + pv.size \
                or not rd.fits(disk, count):
            rd.errors.append(f"lvm: {vg_name}/{lv_name} {key} lies outside its PV")
            continue
        segs.append((disk, start, count))
    return Lv(f"{vg_name}/{lv_name}", lv_name, str(lv.get("id", "")), size,
              tuple(sorted(segs, key=lambda s: s[1])) if supported else (), supported)

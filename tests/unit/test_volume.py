"""The volume map against what sfdisk and blkid say about the real MBR/GPT test images, and against hostile tables."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from images.build import artifact
from inference.errors import CorruptMetadata
from inference.volume import Volume, VolumeMap
from inference.volume.lvm import ConfigError, parse_config
from tests.support import require_tools

MiB = 1 << 20
SPAN = 64 * 1024


class Disk:
    """An image file read through pread, with in-memory patches on top (the image itself is never modified)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.patches: dict[int, bytes] = {}

    def read(self, off: int, n: int) -> bytes:
        data = bytearray(os.pread(self.fd, n, off))
        for at, blob in self.patches.items():
            lo, hi = max(at, off), min(at + len(blob), off + n)
            if lo < hi:
                data[lo - off: hi - off] = blob[lo - at: hi - at]
        return bytes(data)

    def patch(self, at: int, blob: bytes) -> None:
        """Write `blob` at `at` on top of the previous patches."""
        base = bytearray(self.read(at, len(blob)))
        base[:] = blob
        self.patches[at] = bytes(base)

    def map(self) -> VolumeMap:
        m = VolumeMap(self.read, self.size)
        m.scan()
        return m


@pytest.fixture
def mbr() -> Iterator[Disk]:
    d = Disk(artifact("mbr.img"))
    yield d
    os.close(d.fd)


@pytest.fixture
def gpt() -> Iterator[Disk]:
    d = Disk(artifact("gpt.img"))
    yield d
    os.close(d.fd)


def sfdisk(path: Path) -> list[dict]:
    require_tools("sfdisk")
    out = subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]["partitions"]


def blkid(path: Path, offset: int) -> dict[str, str]:
    require_tools("blkid")
    p = subprocess.run(["blkid", "-p", "-O", str(offset), "-o", "export", str(path)], capture_output=True, text=True)
    return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


def ext_label(m: VolumeMap, read, vol: Volume) -> str:
    """The ext volume label (s_volume_name), read through locate() as the engine would."""
    base = vol.segments[0][0]
    pieces = m.locate(base + 1024 + 120, 16)
    assert [(p[0], p[1]) for p in pieces] == [(vol, 1024 + 120)]
    return read(pieces[0][2], 16).rstrip(b"\0").decode()


@pytest.mark.parametrize("image", ["mbr.img", "gpt.img"])
def test_volumes_match_sfdisk_and_blkid(image: str) -> None:
    path = artifact(image)
    disk = Disk(path)
    m = disk.map()
    assert m.errors == [] and m.table == image[:3].replace("mbr", "dos")
    expected = sfdisk(path)
    assert [v.name for v in m.volumes] == ["p" + p["node"].removeprefix(str(path)) for p in expected]
    for vol, part in zip(m.volumes, expected, strict=True):
        assert vol.segments == ((part["start"] * 512, 0, part["size"] * 512),)
        assert vol.size == part["size"] * 512
        assert vol.label == part.get("name", "") and vol.uuid == part.get("uuid", "").lower()
        if part["type"] == "5":
            assert vol.kind == "extended"
            continue
        probe = blkid(path, part["start"] * 512)
        assert vol.kind == {"ext4": "ext", "swap": "swap"}[probe["TYPE"]]
        if vol.kind == "ext":
            assert ext_label(m, disk.read, vol) == probe["LABEL"] == f"{image[:3]}-{vol.name}"


def test_whole_disk_fs_and_blank_disk() -> None:
    disk = Disk(artifact("ext4.img"))
    m = disk.map()
    assert [(v.name, v.kind, v.segments) for v in m.volumes] == [("disk", "ext", ((0, 0, disk.size),))]
    assert m.locate(4096, 4096) == [(m.volumes[0], 4096, 4096, 4096)]
    blank = VolumeMap(lambda off, n: bytes(n), 8 * MiB)
    assert [(v.name, v.kind) for v in blank.scan()] == [("disk", "unknown")]
    assert blank.is_layout_write(0, 512) and blank.is_layout_write(512, 512)  # a table may appear
    with pytest.raises(CorruptMetadata):
        VolumeMap(lambda off, n: bytes(n), 100).scan()

    def broken(off: int, n: int) -> bytes:
        raise OSError("EIO")
    with pytest.raises(CorruptMetadata):
        VolumeMap(broken, MiB).scan()


def test_locate_boundaries(mbr: Disk) -> None:
    m = mbr.map()
    p = {v.name: v for v in m.volumes}
    p1_end = p["p1"].segments[0][0] + p["p1"].size
    assert p1_end == p["p2"].segments[0][0]
    assert m.locate(0, 512) == [] and m.locate(MiB - 4096, 4096) == []  # MBR and the gap before p1
    assert m.locate(MiB - 512, 1024) == [(p["p1"], 0, MiB, 512)]  # clipped at the start of p1
    assert m.locate(p1_end - 1024, 4096) == [(p["p1"], p["p1"].size - 1024, p1_end - 1024, 1024),
                                             (p["p2"], 0, p1_end, 3072)]
    assert m.locate(p1_end - 1, 1) == [(p["p1"], p["p1"].size - 1, p1_end - 1, 1)]
    assert m.locate(p1_end, 0) == []
    ext_start = p["p4"].segments[0][0]
    assert m.locate(ext_start, 512) == []  # the EBR belongs to no file system ...
    assert m.is_layout_write(ext_start + 100, 1)  # ... it is layout
    p5_start, p5_end = p["p5"].segments[0][0], p["p5"].segments[0][0] + p["p5"].size
    assert m.locate(p5_end - 512, MiB) == [(p["p5"], p["p5"].size - 512, p5_end - 512, 512)]
    assert m.locate(mbr.size - 512, 512) == []
    assert m.locate(p5_start + 5 * MiB, 8192) == [(p["p5"], 5 * MiB, p5_start + 5 * MiB, 8192)]
    # layout: MBR, EBR, and each volume's signature page (mkfs/mkswap/pvcreate change a kind); not its data
    assert m.is_layout_write(0, 1) and m.is_layout_write(510, 2) and not m.is_layout_write(512, 512)
    assert m.is_layout_write(MiB - 1, 2) and m.is_layout_write(p5_start + 1024, 1024)
    assert not m.is_layout_write(p5_start + 4096, 4096) and not m.is_layout_write(MiB + 8192, 512)


def test_gpt_layout_regions(gpt: Disk) -> None:
    m = gpt.map()
    last = gpt.size - 512
    assert m.is_layout_write(512, 92) and m.is_layout_write(2 * 512 + 128, 128)  # header, entries
    assert m.is_layout_write(last, 512) and m.is_layout_write(last - 32 * 512, 512)  # backup header, entries
    assert not m.is_layout_write(40 * 512, 512) and not m.is_layout_write(last - 34 * 512, 512)


def test_corrupt_primary_gpt_falls_back_to_backup(gpt: Disk) -> None:
    good = [(v.name, v.label, v.uuid, v.segments) for v in gpt.map().volumes]
    gpt.patch(512 + 24, b"\x07")  # primary header: my_lba, CRC now wrong
    m = gpt.map()
    assert [(v.name, v.label, v.uuid, v.segments) for v in m.volumes] == good
    assert any("primary header CRC" in e for e in m.errors) and any("backup" in e for e in m.errors)
    gpt.patches.clear()
    gpt.patch(2 * 512 + 56, b"Z")  # an entry of the primary array: entries CRC wrong
    m = gpt.map()
    assert [(v.name, v.segments) for v in m.volumes] == [(n, s) for n, _, _, s in good]
    assert any("entries CRC" in e for e in m.errors)
    gpt.patch(gpt.size - 512, b"XXXX")  # and the backup header too: no table left, no volumes, no exception
    m = gpt.map()
    assert m.volumes == [] and any("no backup header" in e for e in m.errors)


def test_looping_ebr_chain_is_bounded(mbr: Disk) -> None:
    ext = next(v for v in mbr.map().volumes if v.name == "p4").segments[0][0]
    link = ext + 446 + 16  # the second entry of the first EBR: the link to the next EBR
    start = struct.unpack_from("<I", mbr.read(ext + 446 + 8, 4))[0]
    mbr.patch(link, bytes([0, 0, 0, 0, 5, 0, 0, 0]) + struct.pack("<II", 0, 1))  # next EBR = this one
    m = mbr.map()
    assert [v.name for v in m.volumes] == ["p1", "p2", "p3", "p4", "p5"]
    assert any("loops" in e for e in m.errors)
    # a long chain: each EBR links to the next sector, each holding a 1-sector logical partition far away
    mbr.patches.clear()
    for i in range(300):
        ebr = bytearray(512)
        ebr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", start + 4096, 1)
        ebr[462:478] = bytes([0, 0, 0, 0, 5, 0, 0, 0]) + struct.pack("<II", i + 1, 1)
        ebr[510:512] = b"\x55\xaa"
        mbr.patch(ext + i * 512, bytes(ebr))
    t0 = time.monotonic()
    m = mbr.map()
    assert time.monotonic() - t0 < 1
    assert len([v for v in m.volumes if int(v.name[1:]) >= 5]) == 128
    assert any("more than 128" in e for e in m.errors)


def test_overlapping_partitions_are_reported_not_fatal(mbr: Disk) -> None:
    entry = bytes([0x80, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 65536 * 2)  # p1 now covers p2
    mbr.patch(446, entry)
    m = mbr.map()
    p1 = m.volumes[0]
    assert m.locate(p1.segments[0][0] + 40 * MiB, 512)[0][0] is p1
    assert any("overlaps" in e for e in m.errors)


def test_config_parser() -> None:
    text = '''vg { id = "a-b" seqno = 3  # comment
      extent_size = 8192 flags = []
      logical_volumes { 1lv { status = ["READ", "VISIBLE"] segment1 { stripes = [ "pv0", 10 ] } } }
      f = 1.5 s = "q\\"uote" neg = -4
    }
    contents = "Text Format Volume Group"\0'''
    c = parse_config(text.rstrip("\0"))
    vg = c["vg"]
    assert vg["id"] == "a-b" and vg["seqno"] == 3 and vg["flags"] == [] and vg["f"] == 1.5 and vg["neg"] == -4
    assert vg["s"] == 'q"uote' and vg["logical_volumes"]["1lv"]["segment1"]["stripes"] == ["pv0", 10]
    assert c["contents"] == "Text Format Volume Group"
    for bad in ("a {", "a = ", "= 3", "a = [1, 2", "a b", "a = \"x", "a = {", "}", "a { b = 1 } }", "a = $"):
        with pytest.raises(ConfigError):
            parse_config(bad)
    with pytest.raises(ConfigError, match="deep"):
        parse_config("a { " * 100 + "}" * 100)


@given(st.text(alphabet='ab01 ={}[],"#\n\\-.', max_size=300))
@settings(max_examples=300, deadline=None)
def test_config_parser_fuzz(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError:
        pass


def _fix_gpt_crcs(disk: Disk) -> None:
    """Recompute the primary GPT's CRCs so that mutated entries get past the checksum into the parser."""
    hdr = bytearray(disk.read(512, 92))
    num, size = struct.unpack_from("<II", hdr, 80)
    if 0 < num <= 1024 and 128 <= size <= 4096:
        struct.pack_into("<I", hdr, 88, zlib.crc32(disk.read(1024, num * size)))
    hdr[16:20] = bytes(4)
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
    disk.patch(512, bytes(hdr))


MUTATION = st.tuples(st.booleans(), st.integers(0, SPAN - 1), st.binary(min_size=1, max_size=64))
TARGETED = st.tuples(st.sampled_from([446, 454, 458, 462, 470, 474, 512 + 72, 512 + 80, 512 + 84, 1024 + 32,
                                      1024 + 40, 1024 + 128 + 32]),
                     st.sampled_from([0, 1, 2048, 2**31, 2**32 - 1, 262143, 262144, 133120, 1024, 129]))


@pytest.mark.parametrize("image", ["mbr.img", "gpt.img"])
@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_corruption_never_crashes(image: str, data: st.DataObject) -> None:
    disk = Disk(artifact(image))
    try:
        disk.patches.clear()
        for at_end, off, blob in data.draw(st.lists(MUTATION, max_size=12)):
            disk.patch((disk.size - SPAN if at_end else 0) + off, blob)
        for off, value in data.draw(st.lists(TARGETED, max_size=4)):
            ext = 133120 * 512 if image == "mbr.img" and data.draw(st.booleans()) else 0
            disk.patch(ext + off, struct.pack("<I", value))
        if image == "gpt.img" and data.draw(st.booleans()):
            _fix_gpt_crcs(disk)
        t0 = time.monotonic()
        m = VolumeMap(disk.read, disk.size)
        try:
            m.scan()
        except CorruptMetadata:
            return
        for v in m.volumes:
            for d, _, n in v.segments:
                assert 0 <= d and d + n <= disk.size
            m.locate(v.segments[0][0], 4096)
        m.locate(0, disk.size)
        m.is_layout_write(0, disk.size)
        assert time.monotonic() - t0 < 2
    finally:
        os.close(disk.fd)


def test_locate_speed(mbr: Disk) -> None:
    """locate() runs for every guest write: it must stay in the microseconds (bisect over disjoint segments)."""
    m = mbr.map()
    offsets = [(i * 7919 * 4096) % mbr.size for i in range(20000)]
    t0 = time.perf_counter()
    for off in offsets:
        m.locate(off, 4096)
    rate = len(offsets) / (time.perf_counter() - t0)
    print(f"locate: {rate:,.0f} calls/s")
    assert rate > 100_000

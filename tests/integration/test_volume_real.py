"""The volume map on disks made by the real LVM2 tools: LVs, segments, and a metadata update seen as layout writes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from images.build import artifact, cache_dir, lvm_layout, lvm_session
from inference.errors import CorruptMetadata
from inference.volume import Volume, VolumeMap
from inference.volume.lvm import lvm_crc
from tests.support import require_root, require_tools

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _real_lvm() -> None:
    require_root()
    require_tools("pvcreate", "losetup", "lvm", "sfdisk")


def scan(path: Path) -> VolumeMap:
    """A scanned map of an image file (locate() needs no reads after the scan)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        m = VolumeMap(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size)
        m.scan()
    finally:
        os.close(fd)
    return m


def copy(name: str, dest: Path) -> Path:
    out = dest / name
    subprocess.run(["cp", "--sparse=always", str(artifact(name)), str(out)], check=True)
    return out


def lv_fs_label(path: Path, m: VolumeMap, vol: Volume) -> tuple[bytes, str]:
    """ext magic and label of an LV, read piecewise through locate() (the superblock is in its first segment)."""
    with open(path, "rb") as f:
        out = b""
        for _, _, disk, n in m.locate(vol.segments[0][0] + 1024, 1024):
            f.seek(disk)
            out += f.read(n)
    return out[56:58], out[120:136].rstrip(b"\0").decode()


def check_against_tools(path: Path, m: VolumeMap, truth: dict) -> dict[str, Volume]:
    lvs = {v.label: v for v in m.volumes if "/" in v.name}
    assert sorted(lvs) == sorted(truth["lvs"])
    for name, t in truth["lvs"].items():
        v = lvs[name]
        assert v.name == f"{truth['vg']}/{name}" and v.uuid == t["uuid"] and v.size == t["size"]
        assert [list(s) for s in v.segments] == t["segments"], name
    return lvs


def test_lvm_volumes_match_the_tools(tmp_path: Path) -> None:
    path = copy("lvm.img", tmp_path)
    truth = json.loads((cache_dir() / "lvm.json").read_text())
    m = scan(path)
    assert m.errors == []
    assert (m.volumes[0].name, m.volumes[0].kind) == ("disk", "lvm-pv")
    lvs = check_against_tools(path, m, truth)
    one, two = lvs["one"], lvs["two"]
    assert len(one.segments) == 2 and len(two.segments) == 1
    for name, v in lvs.items():
        assert v.kind == "ext" and lv_fs_label(path, m, v) == (b"\x53\xef", f"lvm-{name}")
    # a write inside LV one's second segment; a write across LV two's end into it (adjacent on the PV)
    seg2_disk, seg2_lv, _ = one.segments[1]
    assert m.locate(seg2_disk + 8192, 4096) == [(one, seg2_lv + 8192, seg2_disk + 8192, 4096)]
    assert two.segments[0][0] + two.size == seg2_disk
    assert m.locate(seg2_disk - 4096, 8192) == [(two, two.size - 4096, seg2_disk - 4096, 4096),
                                                 (one, seg2_lv, seg2_disk, 4096)]
    assert m.locate(one.segments[0][0] - 4096, 4096) == []  # the metadata area belongs to no LV ...
    assert m.is_layout_write(4096, 512) and m.is_layout_write(512, 512)  # ... it is layout, as is the label
    free = truth["pe_start"] + 20 * truth["extent_size"]
    assert m.locate(free, 4096) == [] and not m.is_layout_write(free, 4096)
    assert not m.is_layout_write(seg2_disk + 8192, 4096)


def test_metadata_update_is_a_layout_write(tmp_path: Path) -> None:
    path = copy("lvm.img", tmp_path)
    before_bytes = path.read_bytes()
    before = scan(path)
    with lvm_session(path) as (lvm, _):
        lvm("lvcreate", "-q", "-an", "-Zn", "-Wn", "-L", "8M", "-n", "three", "vgmirror")
        lvm("lvextend", "-q", "-L", "+8M", "vgmirror/two")
        truth = lvm_layout(lvm)
    after_bytes = path.read_bytes()
    changed = [off for off in range(0, len(after_bytes), 512)
               if before_bytes[off: off + 512] != after_bytes[off: off + 512]]
    assert changed, "lvm wrote nothing?"
    assert all(before.is_layout_write(off, 512) for off in changed), \
        [off for off in changed if not before.is_layout_write(off, 512)]
    after = scan(path)
    lvs = check_against_tools(path, after, truth)
    assert lvs["three"].kind == "unknown" and len(lvs["two"].segments) == 2  # not zeroed, no file system
    assert truth["seqno"] == json.loads((cache_dir() / "lvm.json").read_text())["seqno"] + 2


def test_lvm_inside_a_partition(tmp_path: Path) -> None:
    path = tmp_path / "part.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["sfdisk", "-q", str(path)], input=b"label: dos\nstart=2048, size=40MiB, type=8e\n", check=True)
    start, size = 2048 * 512, 40 * MiB
    with lvm_session(path, offset=start, size=size) as (lvm, loop):
        lvm("pvcreate", "-q", loop)
        lvm("vgcreate", "-q", "vgpart", loop)
        lvm("lvcreate", "-q", "-an", "-Zn", "-Wn", "-L", "12M", "-n", "data", "vgpart")
        truth = lvm_layout(lvm)
    m = scan(path)
    assert [(v.name, v.kind) for v in m.volumes] == [("p1", "lvm-pv"), ("vgpart/data", "unknown")]
    data = m.volumes[1]
    assert data.segments == ((start + truth["pe_start"], 0, 12 * MiB),)
    assert m.locate(start + truth["pe_start"], 512) == [(data, 0, start + truth["pe_start"], 512)]
    assert m.is_layout_write(start + 512, 512) and m.is_layout_write(start + 4096, 512)


def _fix_mda(disk: bytearray) -> None:
    """After mutating the metadata text, make its checksums right again so the parser, not the CRC, meets it."""
    hdr = 4096
    off, size = struct.unpack_from("<QQ", disk, hdr + 40)
    area = struct.unpack_from("<Q", disk, hdr + 32)[0]
    if 512 <= off < area and 0 < size <= area - off:
        struct.pack_into("<I", disk, hdr + 56, lvm_crc(bytes(disk[hdr + off: hdr + off + size])))
    struct.pack_into("<I", disk, hdr, lvm_crc(bytes(disk[hdr + 4: hdr + 512])))


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_hostile_lvm_metadata(data: st.DataObject) -> None:
    """Random bytes in the label, the mda header and the VG text (with checksums fixed): errors, never a crash."""
    head = bytearray(open(artifact("lvm.img"), "rb").read(64 * 1024))
    text_at = 4096 + struct.unpack_from("<Q", head, 4096 + 40)[0]
    text_len = struct.unpack_from("<Q", head, 4096 + 48)[0]
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.sampled_from(["label", "mda", "text", "text"]))
        lo, hi = {"label": (512, 1024), "mda": (4096, 4160), "text": (text_at, text_at + text_len)}[where]
        at = data.draw(st.integers(lo, hi - 1))
        blob = data.draw(st.one_of(st.binary(min_size=1, max_size=16),
                                   st.sampled_from([b"{", b"}", b"[", b"=", b'"', b"99999999999999999999", b"-1",
                                                    b"segment9 {", b"0", b"\\", b"#"])))
        head[at: at + len(blob)] = blob
        head = head[: 64 * 1024]
    if data.draw(st.booleans()):
        _fix_mda(head)
    size = 128 * MiB
    m = VolumeMap(lambda off, n: bytes(head[off: off + n]).ljust(n, b"\0"), size)
    try:
        m.scan()
    except CorruptMetadata:
        return
    for v in m.volumes:
        assert all(0 <= d and d + n <= size for d, _, n in v.segments)


def test_lvm_build_cleans_up_loops() -> None:
    """The recipe and the sessions above leave no loop device attached to our images."""
    require_tools("losetup")
    attached = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert "lvm.img" not in attached and "part.img" not in attached
    assert shutil.which("lvm")

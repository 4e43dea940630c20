"""A hostile guest: garbage written over real metadata and journal blocks. The engine reports errors and goes on.

No QEMU needed: the records are made here, over the real test images, exactly as the tap would log them.
"""

from __future__ import annotations

import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.engine import Engine
from inference.events import KINDS, Mutation
from inference.ext import reader as R
from tap.writelog import KIND_WRITE, KIND_ZEROES, Record

pytestmark = pytest.mark.integration

IMAGES = ("ext4.img", "ext3.img", "ext2.img")
_targets: dict[str, dict[str, list[int]]] = {}


def targets(image: str) -> dict[str, list[int]]:
    """Block numbers of each kind of metadata in the image: what a hostile guest would aim at."""
    if image in _targets:
        return _targets[image]
    from images.build import artifact

    path = artifact(image)
    with open(path, "rb") as f:
        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        r = R.ExtReader(read)
        geo = r.geo
        out: dict[str, list[int]] = {"superblock": [0 if geo.block_size > 1024 else 1], "gdt": R.gdt_blocks(geo)}
        out["itable"] = [d.inode_table + k for d in r.descs[:2] for k in range(4)]
        many = r.lookup(b"/many")
        extents, meta = R.file_map(many, geo, r.read_block)
        out["dir"] = [e.physical for e in extents][:4] + [e.physical for e in r.extents(2)[0]]
        out["mapping"] = meta or [e.physical for e in extents][:1]
        if geo.has_journal:
            jext, _ = r.extents(geo.journal_inum)
            out["journal"] = [jext[0].physical + k for k in range(0, 8)]
        tagged = r.lookup(b"/xattrs/tagged.txt") if _exists(r, b"/xattrs/tagged.txt") else None
        if tagged is not None and tagged.file_acl:
            out["xattr"] = [tagged.file_acl]
    _targets[image] = out
    return out


def _exists(r: R.ExtReader, path: bytes) -> bool:
    try:
        r.lookup(path)
        return True
    except (FileNotFoundError, R.CorruptMetadata):
        return False


def jbd2_lookalike(data: bytes, tid: int) -> bytes:
    """A block with the jbd2 magic and a descriptor or commit type: the tracker must check, not trust."""
    return (0xC03B3998).to_bytes(4, "big") + (1 + tid % 2).to_bytes(4, "big") + tid.to_bytes(4, "big") + data[12:]


corruption = st.tuples(
    st.sampled_from(["superblock", "gdt", "itable", "dir", "mapping", "journal", "xattr"]),
    st.integers(0, 7),                                   # which block of that kind
    st.sampled_from(["random", "flip", "zero", "jbd2", "ones"]),
    st.binary(min_size=16, max_size=64),                 # repeated over the block
    st.integers(0, 4095),                                # where to flip
)


@pytest.mark.parametrize("image", IMAGES)
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(writes=st.lists(corruption, min_size=1, max_size=6))
def test_garbage_metadata_gives_error_events_never_a_crash(tmp_path_factory, image, writes):
    from images.build import artifact

    work = tmp_path_factory.mktemp("hostile")
    base = work / "base.raw"
    shutil.copyfile(artifact(image), base)
    aims = targets(image)
    engine = Engine(work / "engine", base.stat().st_size, base=base)
    handler = next(iter(engine.filesystems.values())).handler
    bs = handler.geo.block_size
    before = len(handler.tree)
    records = []
    for seq, (kind, which, how, noise, pos) in enumerate(writes, start=1):
        blocks = aims.get(kind) or aims["itable"]
        block = blocks[which % len(blocks)]
        with open(base, "rb") as f:
            f.seek(block * bs)
            data = bytearray(f.read(bs))
        if how == "random":
            data[:] = (noise * (bs // len(noise) + 1))[:bs]
        elif how == "flip":
            data[pos % bs] ^= 0xFF
        elif how == "jbd2":
            data[:] = jbd2_lookalike((noise * (bs // len(noise) + 1))[:bs], seq)
        elif how == "ones":
            data[:] = b"\xff" * bs
        rec_kind = KIND_ZEROES if how == "zero" else KIND_WRITE
        payload = b"" if how == "zero" else bytes(data)
        records.append(Record(seq, time.time_ns() + seq * 10**9, rec_kind, block * bs, bs, payload))
    tracemalloc.start()
    start = time.monotonic()
    events = engine.process(records) + engine.finish()
    elapsed = time.monotonic() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    engine.close()
    assert all(isinstance(e, Mutation) and e.kind in KINDS for e in events)
    assert elapsed < 20, f"{len(records)} hostile writes took {elapsed:.1f} s"
    assert peak < 256 << 20, f"peak allocation {peak >> 20} MiB"
    assert len(handler.tree) <= before + handler.geo.inodes_count
    for e in events:
        e.to_json()  # every event, errors included, serializes


def test_garbage_directory_block_is_an_error_event(tmp_path):
    """Deterministic: a directory block full of 0xff is reported (at the latest when the replay ends)."""
    from images.build import artifact

    base = tmp_path / "base.raw"
    shutil.copyfile(artifact("ext2.img"), base)
    block = targets("ext2.img")["dir"][0]
    engine = Engine(tmp_path / "engine", base.stat().st_size, base=base)
    bs = next(iter(engine.filesystems.values())).handler.geo.block_size
    events = engine.process([Record(1, time.time_ns(), KIND_WRITE, block * bs, bs, b"\xff" * bs)])
    events += engine.finish()
    errors = [e for e in events if e.kind == "error"]
    assert errors and "directory" in errors[0].message
    engine.close()


def test_engine_keeps_going_after_garbage(tmp_path):
    """After an error, a later good change to the same file system still becomes its event."""
    from images.build import artifact

    base = tmp_path / "base.raw"
    shutil.copyfile(artifact("ext2.img"), base)
    engine = Engine(tmp_path / "engine", base.stat().st_size, base=base)
    handler = next(iter(engine.filesystems.values())).handler
    bs = handler.geo.block_size
    dir_block = targets("ext2.img")["dir"][0]
    t = time.time_ns()
    good = Path(base).read_bytes()[dir_block * bs:(dir_block + 1) * bs]
    events = engine.process([Record(1, t, KIND_WRITE, dir_block * bs, bs, b"\xff" * bs)])
    # the guest repairs it (as e2fsck would): the old content comes back, and then a chmod of /many
    events += engine.process([Record(2, t + 40 * 10**9, KIND_WRITE, dir_block * bs, bs, good)])
    ino = handler.reader.lookup(b"/many").ino
    blk, off = R.inode_location(ino, handler.geo, handler.reader.descs)
    raw = bytearray(handler.read_home(blk * bs, bs))
    mode = int.from_bytes(raw[off:off + 2], "little")
    raw[off:off + 2] = ((mode & ~0o777) | 0o700).to_bytes(2, "little")
    events += engine.process([Record(3, t + 41 * 10**9, KIND_WRITE, blk * bs, bs, bytes(raw))])
    events += engine.finish()
    assert any(e.kind == "attrib" and e.path == "/many" and e.mode == 0o700 for e in events), events
    engine.close()

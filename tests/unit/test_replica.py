"""The block replica: apply/read, holes, base images, checkpoints, catch-up and point-in-time builds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tap.replica import BlockReplica, build_replica
from tap.writelog import KIND_FLUSH, KIND_TRIM, KIND_WRITE, KIND_ZEROES, Record, WriteLog

MiB = 1 << 20


def rec(seq: int, kind: int, offset: int, length: int, payload: bytes = b"") -> Record:
    return Record(seq, 0, kind, offset, length, payload)


def test_apply_and_read(tmp_path: Path) -> None:
    with BlockReplica(tmp_path / "r.img", MiB) as r:
        assert r.applied_seq == 0 and (tmp_path / "r.img").stat().st_size == MiB
        assert r.apply(rec(1, KIND_WRITE, 4096, 5, b"hello"))
        assert r.apply(rec(2, KIND_FLUSH, 0, 0))
        assert r.apply(rec(3, KIND_TRIM, 4096, 4096))  # unspecified content: left as is
        assert not r.apply(rec(3, KIND_WRITE, 0, 1, b"x"))  # already applied
        assert r.read(4094, 9) == b"\0\0hello\0\0"
        assert r.applied_seq == 3
        for bad in (rec(4, KIND_WRITE, MiB - 2, 3, b"abc"), rec(4, KIND_ZEROES, -1, 2)):
            with pytest.raises(ValueError, match="outside the disk"):
                r.apply(bad)
        with pytest.raises(ValueError):
            r.read(MiB, 1)


def test_zeroes_punch_holes(tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    with BlockReplica(path, 8 * MiB) as r:
        r.apply(rec(1, KIND_WRITE, MiB, 4 * MiB, b"\xaa" * (4 * MiB)))
        r.checkpoint()
        assert path.stat().st_blocks * 512 >= 4 * MiB
        r.apply(rec(2, KIND_ZEROES, MiB + 100, 4 * MiB - 200))  # unaligned ends are zeroed in place
        assert path.stat().st_blocks * 512 <= 64 << 10
        assert r.read(MiB, 4 * MiB) == b"\xaa" * 100 + bytes(4 * MiB - 200) + b"\xaa" * 100


def test_zeroes_without_punch_support(tmp_path: Path) -> None:
    with BlockReplica(tmp_path / "r.img", 4 * MiB) as r:
        r._punch = False  # as on a file system that cannot punch holes
        r.write(0, b"\xff" * (3 * MiB))
        r.zero(10, 3 * MiB - 20)
        assert r.read(0, 3 * MiB) == b"\xff" * 10 + bytes(3 * MiB - 20) + b"\xff" * 10


def test_base_image_copied_sparse(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(3 * MiB)
        f.write(b"\x11" * 8192)
        f.seek(15 * MiB)
        f.write(b"\x22" * 100)
    with BlockReplica(tmp_path / "r.img", 16 * MiB, base=base) as r:
        assert r.read(0, 16 * MiB) == base.read_bytes()
        assert (tmp_path / "r.img").stat().st_blocks <= base.stat().st_blocks + 64
        r.write(3 * MiB, b"new")
    with BlockReplica(tmp_path / "r.img", 16 * MiB, base=base) as r:  # existing: not copied again
        assert r.read(3 * MiB, 4) == b"new\x11"
    with pytest.raises(ValueError, match=r"16777216 bytes.* 1048576"):
        BlockReplica(tmp_path / "other.img", MiB, base=base)
    assert not (tmp_path / "other.img").exists()
    with pytest.raises(ValueError, match="1048576"):
        BlockReplica(tmp_path / "r.img", MiB)  # existing replica of another size


def test_checkpoint_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    with BlockReplica(path, MiB) as r:
        r.apply(rec(7, KIND_WRITE, 0, 2, b"ab"))
        r.checkpoint()
        r.apply(rec(8, KIND_WRITE, 0, 2, b"cd"))
    assert (tmp_path / "r.img.seq").read_text() == "7\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.img", "r.img.seq"]
    with BlockReplica(path, MiB) as r:
        assert r.applied_seq == 7


def _random_log(log_dir: Path, n: int, size: int, seed: int) -> None:
    import random

    rnd = random.Random(seed)
    with WriteLog(log_dir, segment_bytes=64 << 10) as log:
        for _ in range(n):
            off = rnd.randrange(size)
            length = rnd.randrange(1, min(20_000, size - off) + 1)
            if rnd.random() < 0.8:
                log.append(KIND_WRITE, off, length, rnd.randbytes(length))
            else:
                log.append(KIND_ZEROES, off, length)


def test_catch_up_after_crash_equals_build(tmp_path: Path) -> None:
    size, logd = 2 * MiB, tmp_path / "log"
    _random_log(logd, 100, size, 1)
    with BlockReplica(tmp_path / "r.img", size) as r:
        assert r.catch_up(logd, until=40) == 40
        r.checkpoint()
    _random_log(logd, 100, size, 2)  # appended while the replica was not applied
    with BlockReplica(tmp_path / "r.img", size) as r:
        r.catch_up(logd, until=150)  # applied but never checkpointed: "crash"
    with BlockReplica(tmp_path / "r.img", size) as r:
        assert r.applied_seq == 40
        assert r.catch_up(logd) == 200
        got = r.read(0, size)
    assert build_replica(logd, tmp_path / "full.img", size) == 200
    assert (tmp_path / "full.img").read_bytes() == got


def test_build_replica_until_and_progress(tmp_path: Path) -> None:
    size, logd = MiB, tmp_path / "log"
    with WriteLog(logd) as log:
        log.append(KIND_WRITE, 0, 3, b"one")
        log.append(KIND_ZEROES, 0, 1)
        log.append(KIND_WRITE, 100, 3, b"two")
    calls: list[tuple[int, int]] = []
    out = tmp_path / "at2.img"
    assert build_replica(logd, out, size, until=2, progress=lambda a, b: calls.append((a, b))) == 2
    assert out.read_bytes()[:3] == b"\0ne" and calls[-1] == (2, 2)
    assert (tmp_path / "at2.img.seq").read_text() == "2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at2.img", "at2.img.seq", "log"]
    with BlockReplica(out, size) as r:  # a built replica is a replica: it can catch up
        assert r.catch_up(logd) == 3 and r.read(100, 3) == b"two"
    assert build_replica(logd, out, size) == 3  # replaces it
    assert out.read_bytes()[:103] == b"\0ne" + bytes(97) + b"two"


def test_build_replica_with_base(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"B" * 4096)
    with WriteLog(tmp_path / "log") as log:
        log.append(KIND_WRITE, 10, 2, b"xy")
    build_replica(tmp_path / "log", tmp_path / "out.img", 4096, base=base)
    assert (tmp_path / "out.img").read_bytes() == b"B" * 10 + b"xy" + b"B" * 4084
    with pytest.raises(ValueError, match="4096 bytes.*8192"):
        build_replica(tmp_path / "log", tmp_path / "bad.img", 8192, base=base)
    assert not any(p.name.startswith((".bad", "bad")) for p in tmp_path.iterdir())


DISK = 64 << 10
ops = st.lists(st.tuples(st.sampled_from([KIND_WRITE, KIND_WRITE, KIND_ZEROES, KIND_TRIM, KIND_FLUSH]),
                         st.integers(0, DISK - 1), st.integers(1, 9000), st.integers(0, 255)), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, cut=st.integers(0, 40))
def test_build_replica_matches_model(tmp_path_factory: pytest.TempPathFactory, ops: list, cut: int) -> None:
    d = tmp_path_factory.mktemp("h")
    model, at_cut = bytearray(DISK), bytearray(DISK)
    with WriteLog(d / "log", segment_bytes=16 << 10) as log:
        for i, (kind, off, length, fillbyte) in enumerate(ops, 1):
            length = min(length, DISK - off)
            if kind == KIND_WRITE:
                data = bytes([fillbyte]) * length
                log.append(kind, off, length, data)
                model[off:off + length] = data
            elif kind == KIND_ZEROES:
                log.append(kind, off, length)
                model[off:off + length] = bytes(length)
            else:
                log.append(kind, off if kind == KIND_TRIM else 0, length if kind == KIND_TRIM else 0)
            if i == cut:
                at_cut[:] = model
    if cut >= len(ops):
        at_cut[:] = model
    assert build_replica(d / "log", d / "now.img", DISK) == len(ops)
    assert (d / "now.img").read_bytes() == model
    assert build_replica(d / "log", d / "then.img", DISK, until=cut) == min(cut, len(ops))
    assert (d / "then.img").read_bytes() == at_cut

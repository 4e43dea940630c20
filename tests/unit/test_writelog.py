"""The write log: round trips, segments, torn-tail recovery, followers and readers in other processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from tap.writelog import (
    HEADER,
    KIND_FLUSH,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZEROES,
    SEGMENT_HEADER,
    Gap,
    Kind,
    LogFollower,
    WriteLog,
    follow,
    last_seq,
    list_segments,
    read_records,
    segment_name,
)

REPO = Path(__file__).resolve().parents[2]


def payload(seq: int, size: int) -> bytes:
    """Content derived from the seq, so any reader can check any record."""
    return (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]


def fill(log: WriteLog, n: int, size: int = 1000) -> None:
    for _ in range(n):
        seq = log.last_seq + 1
        assert log.append(KIND_WRITE, seq * 512, size, payload(seq, size)) == seq


def check(records: list, first: int, last: int, size: int = 1000) -> None:
    assert [r.seq for r in records] == list(range(first, last + 1))
    for r in records:
        assert r.payload == payload(r.seq, size) and r.offset == r.seq * 512


def test_round_trip_all_kinds(tmp_path: Path) -> None:
    before = time.time_ns()
    with WriteLog(tmp_path / "log") as log:
        assert log.last_seq == 0
        assert log.append(KIND_WRITE, 4096, 5, b"hello") == 1
        assert log.append(KIND_ZEROES, 1 << 20, 1 << 24) == 2
        assert log.append(KIND_FLUSH, 0, 0) == 3
        assert log.append(KIND_TRIM, 8192, 4096) == 4
        assert log.append(KIND_WRITE, 0, 3, memoryview(b"xyz")) == 5
        assert log.last_seq == 5
    recs = list(read_records(tmp_path / "log"))
    assert [(r.seq, r.kind, r.offset, r.length, r.payload) for r in recs] == [
        (1, KIND_WRITE, 4096, 5, b"hello"), (2, KIND_ZEROES, 1 << 20, 1 << 24, b""), (3, KIND_FLUSH, 0, 0, b""),
        (4, KIND_TRIM, 8192, 4096, b""), (5, KIND_WRITE, 0, 3, b"xyz")]
    times = [r.time_ns for r in recs]
    assert before <= times[0] and times == sorted(times) and times[-1] <= time.time_ns()
    assert [Kind(r.kind).name for r in recs] == ["write", "zeroes", "flush", "trim", "write"]
    assert last_seq(tmp_path / "log") == 5


def test_append_rejects_inconsistent_records(tmp_path: Path) -> None:
    with WriteLog(tmp_path) as log:
        with pytest.raises(ValueError):
            log.append(KIND_WRITE, 0, 10, b"short")
        with pytest.raises(ValueError):
            log.append(KIND_ZEROES, 0, 10, b"data")
        with pytest.raises(ValueError):
            log.append(9, 0, 0)
        with pytest.raises(ValueError):
            log.append(KIND_TRIM, -1, 0)
        assert log.last_seq == 0
        assert log.append(KIND_FLUSH, 0, 0) == 1
    assert len(list(read_records(tmp_path))) == 1


@pytest.mark.parametrize("policy", ["always", "flush", "never"])
def test_fsync_policies(tmp_path: Path, policy: str) -> None:
    with WriteLog(tmp_path, fsync=policy, segment_bytes=4096) as log:
        fill(log, 20)
        log.flush()
        fill(log, 5)
    check(list(read_records(tmp_path)), 1, 25)


def test_bad_fsync_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="always, flush, never"):
        WriteLog(tmp_path, fsync="sometimes")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with WriteLog(tmp_path), pytest.raises(RuntimeError, match="another writer"):
        WriteLog(tmp_path)
    WriteLog(tmp_path).close()


def test_segment_roll_over(tmp_path: Path) -> None:
    with WriteLog(tmp_path, segment_bytes=5000) as log:
        fill(log, 40)
        assert log.bytes_total == sum(p.stat().st_size for p in tmp_path.glob("*.wlog"))
    segs = list_segments(tmp_path)
    assert segs == [1, 6, 11, 16, 21, 26, 31, 36]  # 1040-byte records, 5 fill a 5000-byte segment
    assert sorted(p.name for p in tmp_path.glob("*.wlog")) == [segment_name(s) for s in segs]
    for s in segs:  # each segment is named by the seq of its first record
        assert next(read_records(tmp_path, since=s)).seq == s
        assert (tmp_path / segment_name(s)).stat().st_size <= 5000 + HEADER.size + 1000
    check(list(read_records(tmp_path)), 1, 40)
    with WriteLog(tmp_path, segment_bytes=5000) as log:  # reopen continues the numbering
        assert log.last_seq == 40
        fill(log, 5)
    check(list(read_records(tmp_path)), 1, 45)


def test_read_from_the_middle(tmp_path: Path) -> None:
    with WriteLog(tmp_path, segment_bytes=5000) as log:
        fill(log, 40)
    check(list(read_records(tmp_path, since=17)), 17, 40)
    check(list(read_records(tmp_path, since=17, until=23)), 17, 23)
    check(list(read_records(tmp_path, since=0, until=2)), 1, 2)
    assert list(read_records(tmp_path, since=41)) == []
    assert list(read_records(tmp_path / "missing")) == []


def test_start_seq_found_without_reading_earlier_payloads(tmp_path: Path) -> None:
    """A damaged payload in segment 1 goes unnoticed when reading from segment 3, and is a Gap from 1."""
    with WriteLog(tmp_path, segment_bytes=5000) as log:
        fill(log, 40)
    first = tmp_path / segment_name(1)
    data = bytearray(first.read_bytes())
    data[SEGMENT_HEADER.size + HEADER.size + 10] ^= 0xFF
    first.write_bytes(data)
    third = list_segments(tmp_path)[2]
    check(list(read_records(tmp_path, since=third + 1)), third + 1, 40)
    items = list(read_records(tmp_path))
    assert items[0] == Gap(1, 1, segment_name(1), SEGMENT_HEADER.size, items[0].why)
    check(items[1:], 2, 40)


def _last_record_bounds(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    return size - HEADER.size - 100, size


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header"])
def test_torn_tail_recovery(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good"
    with WriteLog(good) as log:
        fill(log, 2, 100)
        fill(log, 1, 100)
    seg = good / segment_name(1)
    start, end = _last_record_bounds(seg)
    cases = {"truncate": [("cut", p) for p in range(start, end)],
             "flip_payload": [("flip", p) for p in range(start + HEADER.size, end, 7)],
             "flip_header": [("flip", p) for p in range(start, start + HEADER.size)]}
    for what, pos in cases[damage]:
        d = tmp_path / f"case{pos}"
        shutil.copytree(good, d)
        with open(d / segment_name(1), "r+b") as f:
            if what == "cut":
                f.truncate(pos)
            else:
                f.seek(pos)
                byte = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([byte ^ 0x41]))
        check(list(read_records(d)), 1, 2, 100)  # readers never see the torn record
        with WriteLog(d) as log:
            assert log.last_seq == 2, (what, pos)
            assert (d / segment_name(1)).stat().st_size == start
            fill(log, 2, 100)
        check(list(read_records(d)), 1, 4, 100)
        shutil.rmtree(d)


def test_torn_segment_header_recovery(tmp_path: Path) -> None:
    with WriteLog(tmp_path, segment_bytes=3000) as log:
        fill(log, 6)
    assert list_segments(tmp_path)[-1] < 7
    with WriteLog(tmp_path, segment_bytes=3000) as log:
        fill(log, 1)  # rolls over to a new segment
        assert list_segments(tmp_path)[-1] == 7
    os.truncate(tmp_path / segment_name(7), 10)  # the writer died while creating segment 7
    check(list(read_records(tmp_path)), 1, 6)
    with WriteLog(tmp_path, segment_bytes=3000) as log:
        assert log.last_seq == 6
        fill(log, 3)
    check(list(read_records(tmp_path)), 1, 9)


def test_follower_sees_new_records_across_roll_over(tmp_path: Path) -> None:
    follower = LogFollower(tmp_path / "log", max_records=7, max_bytes=3000)
    assert follower.poll() == []  # nothing there yet
    seen = []
    with WriteLog(tmp_path / "log", segment_bytes=6000) as log:
        for round_ in range(6):
            fill(log, 15)
            while batch := follower.poll():
                assert len(batch) <= 7 and sum(HEADER.size + len(r.payload) for r in batch) <= 3000 + 1040
                seen.extend(batch)
            assert len(seen) == 15 * (round_ + 1)
        assert follower.poll() == []
    assert len(list_segments(tmp_path / "log")) > 10
    check(seen, 1, 90)
    follower.close()


def test_follower_returns_a_record_larger_than_max_bytes(tmp_path: Path) -> None:
    with WriteLog(tmp_path) as log:
        fill(log, 3, 10_000)
    with LogFollower(tmp_path, since=2, max_bytes=100) as follower:
        assert [len(follower.poll()) for _ in range(3)] == [1, 1, 0]


def test_trio_follow(tmp_path: Path) -> None:
    async def main() -> list:
        got = []

        async def reader() -> None:
            async for rec in follow(tmp_path, since=3, interval=0.01):
                got.append(rec)
                if rec.seq == 60:
                    return

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                with WriteLog(tmp_path, segment_bytes=8000) as log:
                    for _ in range(12):
                        fill(log, 5)
                        await trio.sleep(0.005)
        return got

    check(trio.run(main), 3, 60)


WRITER = """
import sys
from pathlib import Path
from tap.writelog import KIND_WRITE, WriteLog
d, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with WriteLog(d, fsync="never", segment_bytes=1 << 20) as log:
    print("open", flush=True)
    while n < 0 or log.last_seq < n:
        seq = log.last_seq + 1
        log.append(KIND_WRITE, seq * 512, size, (seq.to_bytes(8, "little") * (size // 8 + 1))[:size])
"""


def _writer(d: Path, n: int, size: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(n), str(size)], cwd=REPO,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
    return proc


def test_reader_in_another_process_while_appending(tmp_path: Path) -> None:
    proc = _writer(tmp_path, 3000, 8192)
    seen = []
    with LogFollower(tmp_path, max_records=100) as follower:
        deadline = time.monotonic() + 60
        while len(seen) < 3000 and time.monotonic() < deadline:
            snapshot = list(read_records(tmp_path, since=len(seen) + 1))
            check(snapshot, len(seen) + 1, len(seen) + len(snapshot), 8192)
            seen.extend(follower.poll())
    assert proc.wait(30) == 0
    check(seen, 1, 3000, 8192)
    assert len(list_segments(tmp_path)) > 10


def test_sigkill_mid_append_restarts_without_gap(tmp_path: Path) -> None:
    for round_ in range(3):
        proc = _writer(tmp_path, -1, 256 << 10)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with WriteLog(tmp_path, segment_bytes=1 << 20) as log:
            last = log.last_seq
            assert last > 0
            fill(log, 1, 256 << 10)
        check(list(read_records(tmp_path)), 1, last + 1, 256 << 10)
        assert round_ == 0 or last > 1

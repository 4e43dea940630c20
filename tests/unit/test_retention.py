"""Retention (issue 14) without a disk: when to fold (`plan`), the fold itself with a crash at every step, the
history's start at a checkpoint (`moment`), the event log cut at it, and the options' parsing."""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import pytest

from inference.eventlog import EventLog, cut_after
from inference.history import HistoryError, moment
from mirrorfs.cli.retain import duration, min_free, size
from tap.replica import BlockReplica, build_replica
from tap.retention import Checkpoint, Policy, Segment, Segments, current, fold, open_replica, plan, start
from tap.writelog import KIND_WRITE, KIND_ZEROES, WriteLog, list_segments, read_records

DISK = 1 << 16
GiB = 1 << 30
S = 10**9


def segs(*spec: tuple[int, int, int]) -> list[Segment]:
    """(first seq, bytes, end time in s), the last one the writer's."""
    return [Segment(f, n, t * S) for f, n, t in spec]


def test_plan_by_age_size_and_free_space() -> None:
    log = segs((1, 100, 10), (11, 100, 20), (21, 100, 30), (31, 50, 2**32))
    roomy = {"free": 100 * GiB, "total": 200 * GiB}
    assert plan(log, Policy(keep_s=15), now_ns=40 * S, reader=None, **roomy) == (20, "--retain")  # ended before 25 s
    assert plan(log, Policy(keep_s=100), now_ns=40 * S, reader=None, **roomy) is None
    assert plan(log, Policy(keep_bytes=160), now_ns=0, reader=None, **roomy) == (20, "--retain-size")  # 350 -> 150
    # the engine reads segment 11: segment 1 may go, 11 not yet
    assert plan(log, Policy(keep_s=1), now_ns=40 * S, reader=11, **roomy) == (10, "--retain")
    assert plan(log, Policy(keep_s=1), now_ns=40 * S, reader=1, **roomy) is None
    assert plan(log, Policy(keep_s=1), now_ns=40 * S, reader=0, **roomy) is None  # no position yet: wait
    # a --sync full copy that ended at seq 35 is not folded into a partial disk
    assert plan(log, Policy(keep_s=1), now_ns=40 * S, reader=None, floor=35, **roomy) is None
    assert plan(log, Policy(keep_s=1), now_ns=40 * S, reader=None, floor=25, **roomy) == (30, "--retain")
    # free space under the floor (5% of 200 GiB = 10 GiB > 1 GiB): the oldest goes even past the engine
    short = {"free": 10 * GiB - 150, "total": 200 * GiB}
    assert plan(log, Policy(keep_s=10**6), now_ns=40 * S, reader=1, **short) == (20, "free space")
    assert plan(log, Policy(min_free_fraction=0, min_free_bytes=5 * GiB), now_ns=0, reader=None, **short) is None
    assert plan(log[-1:], Policy(keep_s=1), now_ns=40 * S, reader=None, **roomy) is None  # the writer's: never


def disk_at(records: list[tuple[int, int, bytes]], seq: int) -> bytes:
    img = bytearray(DISK)
    for _seq, off, data in records[:seq]:
        img[off:off + len(data)] = data
    return bytes(img)


def make_log(tmp: Path, n: int = 60) -> tuple[Path, list[tuple[int, int, bytes]]]:
    """A state dir whose log has `n` writes in segments of ~4 records; (state, [(seq, offset, data)])."""
    state = tmp / "state"
    (state / "log").mkdir(parents=True)
    rng = random.Random(5)
    recs = []
    with WriteLog(state / "log", segment_bytes=24 + 4 * (40 + 512)) as wl:
        for _ in range(n):
            off, data = rng.randrange(0, DISK - 512, 512), rng.randbytes(512)
            if rng.random() < 0.1:
                seq = wl.append(KIND_ZEROES, off, 512)
                data = bytes(512)
            else:
                seq = wl.append(KIND_WRITE, off, 512, data)
            recs.append((seq, off, data))
    return state, recs


def boundary(state: Path, k: int) -> int:
    """The last seq of the k-th segment."""
    return list_segments(state / "log")[k + 1] - 1


def image(path: Path) -> bytes:
    return path.read_bytes()


def test_fold_makes_the_disk_at_s_and_removes_only_whole_older_segments(tmp_path: Path) -> None:
    state, recs = make_log(tmp_path)
    base = tmp_path / "base.img"
    base.write_bytes(bytes(DISK))
    indexed: list[Path] = []

    def index(img: Path, out: Path) -> None:
        indexed.append(img)
        out.write_text("idx")

    s1 = boundary(state, 3)
    times = {r.seq: r.time_ns for r in read_records(state / "log")}
    ck = fold(state, state / "log", DISK, s1, base=base, index=index)
    assert (ck.seq, ck.time_ns) == (s1, times[s1])
    assert image(ck.image) == disk_at(recs, s1) and ck.index is not None and ck.index.read_text() == "idx"
    assert list_segments(state / "log")[0] == s1 + 1  # every segment holding only seqs <= S is gone
    assert current(state) == ck
    # a second fold builds on the first; the first one's files go
    s2 = boundary(state, 4)
    ck2 = fold(state, state / "log", DISK, s2, base=None, index=None)
    assert image(ck2.image) == disk_at(recs, s2) and ck2.index is None
    assert sorted(os.listdir(state / "checkpoint")) == [f"{s2:020d}.{x}" for x in ("img", "img.seq", "json")]
    # the replica, replica --until and the history start there
    with open_replica(state, state / "replica.img", DISK, base) as rep:
        assert rep.applied_seq == len(recs) and rep.read(0, DISK) == disk_at(recs, len(recs))
    out = tmp_path / "until.img"
    img, seq = start(state, base)
    assert build_replica(state / "log", out, DISK, base=img, base_seq=seq, until=s2 + 3) == s2 + 3
    assert image(out) == disk_at(recs, s2 + 3)
    with pytest.raises(Exception, match="not the end of a write-log segment"):
        fold(state, state / "log", DISK, s2 + 2, base=None)
    with pytest.raises(Exception, match="already folded"):
        fold(state, state / "log", DISK, s2, base=None)


@pytest.mark.parametrize("crash", ["image", "index", "commit", "segments", "old"])
def test_a_crash_at_any_step_leaves_a_usable_state(tmp_path: Path, crash: str) -> None:
    state, recs = make_log(tmp_path)
    first = fold(state, state / "log", DISK, boundary(state, 1), index=lambda i, o: o.write_text("x"))
    target = boundary(state, 4)

    class Crash(Exception):
        pass

    def steps(name: str) -> None:
        if name == crash:
            raise Crash(name)

    with pytest.raises(Crash):
        fold(state, state / "log", DISK, target, index=lambda i, o: o.write_text("x"), steps=steps)
    ck = current(state)
    assert ck is not None and ck.seq == (first.seq if crash in ("image", "index", "commit") else target)
    assert image(ck.image) == disk_at(recs, ck.seq)
    # what a rebuild needs is there: the checkpoint and every record after it
    img, seq = start(state, None)
    with BlockReplica(tmp_path / "r.img", DISK, base=img, base_seq=seq) as rep:
        rep.catch_up(state / "log", on_gap=lambda g: pytest.fail(str(g)))
        assert rep.read(0, DISK) == disk_at(recs, len(recs))
    # the next fold goes on and leaves only its own files
    nxt = next(f for f in list_segments(state / "log") if f > ck.seq + 1) - 1
    ck2 = fold(state, state / "log", DISK, nxt, index=lambda i, o: o.write_text("x"))
    assert image(ck2.image) == disk_at(recs, nxt)
    assert sorted(os.listdir(state / "checkpoint")) == [f"{nxt:020d}.{x}" for x in ("img", "img.seq", "json",
                                                                                      "mfsidx")]


def test_segments_lists_complete_ones_with_their_end_times(tmp_path: Path) -> None:
    state, _ = make_log(tmp_path, 20)
    listed = Segments(state / "log").complete()
    firsts = list_segments(state / "log")
    assert [s.first for s in listed] == firsts
    starts = {r.seq: r.time_ns for r in read_records(state / "log")}
    assert [s.end_ns for s in listed[:-1]] == [starts[f] for f in firsts[1:]]


def test_plan_log_folds_past_the_engine_when_free_space_is_short(tmp_path: Path) -> None:
    from tap.retention import plan_log

    state, _ = make_log(tmp_path, 20)
    firsts = list_segments(state / "log")
    segs = Segments(state / "log")
    assert plan_log(state / "log", segs, Policy(keep_s=10**6), now_ns=0, reader=0) is None
    short = Policy(min_free_fraction=0, min_free_bytes=1 << 62)  # more than any file system has free
    assert plan_log(state / "log", segs, short, now_ns=0, reader=0) == (firsts[-1] - 1, "free space")


def test_history_starts_at_the_checkpoint(tmp_path: Path) -> None:
    state, recs = make_log(tmp_path)
    s = boundary(state, 3)
    times = {r.seq: r.time_ns for r in read_records(state / "log")}
    ck = fold(state, state / "log", DISK, s)
    assert moment(state / "log", seq=s, checkpoint=ck).seq == s
    assert moment(state / "log", seq=s + 2, checkpoint=ck).seq == s + 2
    assert moment(state / "log", time_ns=ck.time_ns, checkpoint=ck).seq == s
    assert moment(state / "log", time_ns=times[s + 1], checkpoint=ck).seq == s + 1
    for bad in ({"seq": s - 1}, {"seq": 0}, {"time_ns": ck.time_ns - 1}):
        with pytest.raises(HistoryError, match=f"before the retained history: the retained history is seq {s} .*"
                                               "folded into a checkpoint"):
            moment(state / "log", checkpoint=ck, **bad)


def test_a_replay_from_a_checkpoint_keeps_the_events_up_to_it(tmp_path: Path) -> None:
    from inference.events import Mutation

    path = tmp_path / "events.jsonl"
    with EventLog(path, truncate=True) as log:
        log.append([Mutation(seq=q, time=q, kind="create", path=f"/f{q}", fs="p1", ino=q, type="file")
                    for q in (3, 3, 7, 9, 12)])
    with open(path, "ab") as f:
        f.write(b'{"id":"13-1","seq":13')  # torn
    cut_after(path, 9)
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["3-1", "3-2", "7-1", "9-1"]
    with EventLog(path, truncate=True, keep_until=7) as log:
        (ev,) = log.append([Mutation(seq=9, time=9, kind="delete", path="/f3", fs="p1", ino=3, type="file")])
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["3-1", "3-2", "7-1", "9-1"]
    assert json.loads(path.read_text().splitlines()[-1])["kind"] == "delete"


def test_sizes_durations_and_min_free_parse_with_clear_errors() -> None:
    assert size("10G") == 10 << 30 and size("512M") == 512 << 20 and size("4096") == 4096 and size("1.5K") == 1536
    assert size("2GiB") == 2 << 30
    assert duration("2h") == 7200 and duration("30min") == 1800 and duration("90s") == 90 and duration("7d") == 604800
    assert min_free("5%") == (0.05, 0) and min_free("20G") == (0.0, 20 << 30)
    for bad, fn in (("10 parsecs", size), ("0", size), ("soon", duration), ("-2h", duration), ("150%", min_free)):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


def test_checkpoint_describe() -> None:
    ck = Checkpoint(42, 1_800_000_000_123_000_000, Path("x"), None, 0)
    assert ck.describe() == "seq 42 (2027-01-15T08:00:00.123Z)"


def test_a_reader_keeps_what_it_started_from_until_a_later_fold(tmp_path: Path) -> None:
    from tap.retention import reading

    state, recs = make_log(tmp_path)
    ends = [f - 1 for f in list_segments(state / "log")[1:]]
    first = fold(state, state / "log", DISK, ends[1])
    segments = list_segments(state / "log")
    with reading(state):  # a `cat --at` that started from `first`
        ck = fold(state, state / "log", DISK, ends[3])
        assert current(state) == ck and list_segments(state / "log") == segments  # nothing it reads is gone
        assert first.image.is_file()
        img, seq = first.image, first.seq  # what it started from still rebuilds the disk
        with BlockReplica(tmp_path / "r.img", DISK, base=img, base_seq=seq) as rep:
            rep.catch_up(state / "log", on_gap=lambda g: pytest.fail(str(g)))
            assert rep.read(0, DISK) == disk_at(recs, len(recs))
        forced = fold(state, state / "log", DISK, ends[4], force=True)  # free space short: gone anyway
        assert list_segments(state / "log")[0] == forced.seq + 1 and not first.image.exists()
    later = fold(state, state / "log", DISK, ends[5])
    assert list_segments(state / "log")[0] == later.seq + 1
    assert sorted(os.listdir(state / "checkpoint")) == [f"{later.seq:020d}.{x}" for x in ("img", "img.seq", "json")]


def test_the_runner_says_which_segment_its_follower_reads(tmp_path: Path) -> None:
    """What retention waits for (DIR/reading.json): the segment the engine's follower is in, as it moves on."""
    import threading

    from inference.runner import Runner
    from tap.writelog import LogFollower

    state, recs = make_log(tmp_path, 30)

    class Engine:  # the runner's side of an engine, no file system behind it
        lock = threading.RLock()
        vm, last_time_ns = "", 0

        def process(self, batch):
            return []

        def finish(self):
            return []

    seen: list[int] = []
    with LogFollower(state / "log", max_records=3) as follower:
        runner = Runner(Engine(), follower, follow=False)
        runner.on_segment = seen.append
        runner.run()
    assert seen == list_segments(state / "log")  # each once, in order, ending with the writer's

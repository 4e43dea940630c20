"""Sizes wait for their bytes (inference/reconcile.py `_hold_sizes`), on synthetic consistency points.

A file's committed size is shown only as far as its bytes are real: holes, data writes, newly mapped blocks; an
unwritten extent or an initialized block not written since waits, until its data, the bound, or the end.
"""

from __future__ import annotations

from dataclasses import replace

from inference.events import Mutation
from inference.reconcile import HOLD_S, Change, Context, Reconciler
from inference.shadow import ROOT_INO, Node, ShadowTree

BS = 4096
INO = 12


def setup(size: int = 1240, extents: tuple = ((0, 100, 1, False),)) -> Reconciler:
    tree = ShadowTree()
    tree.add_node(Node(ino=ROOT_INO, type="dir", mode=0o40755, links=2))
    tree.add_node(Node(ino=INO, type="file", mode=0o100644, size=size, links=1, mtime_ns=1, extents=extents))
    tree.add_name(ROOT_INO, b"log", INO)
    r = Reconciler(tree)
    r.block_size = BS
    return r


def point(r: Reconciler, t: float, size: int | None = None, data: list | None = None,
          extents: tuple | None = None) -> list[Mutation]:
    """One consistency point at record time t: the file re-read with `size` (and `extents`), data ranges."""
    change = Change()
    if size is not None:
        node = r.tree.nodes[INO]
        change.inodes[INO] = replace(node, size=size, mtime_ns=node.mtime_ns + 1, names=[],
                                     extents=extents if extents is not None else node.extents)
    if data:
        change.data[INO] = list(data)
    events, _ = r.apply(change, Context(seq=int(t * 10), time=t))
    return [e for e in events if e.kind in ("modify", "truncate")]


def shown(events: list[Mutation]) -> list[tuple]:
    return [(e.kind, e.size, e.ranges, e.unconfirmed) for e in events]


def test_an_append_inside_the_tail_block_waits_for_its_data() -> None:
    r = setup()
    assert point(r, 1.0, size=1278) == []                       # committed, the page still dirty: held
    assert r.tree.nodes[INO].size == 1240                       # the tree (and reads through it) keep the old size
    assert shown(point(r, 2.0, data=[(1240, 1278)])) == [("modify", 1278, [(1240, 1278)], None)]
    assert not r.holds


def test_data_before_its_size_shows_it_at_the_commit() -> None:
    r = setup()
    assert point(r, 1.0, data=[(1240, 1278)]) == []             # fsync: data first (past the size: no event)
    assert shown(point(r, 1.1, size=1278)) == [("modify", 1278, [(1240, 1278)], None)]


def test_only_a_committed_size_is_shown_never_one_inside_a_write() -> None:
    r = setup()
    point(r, 1.0, size=1278)
    point(r, 2.0, size=1320)
    assert shown(point(r, 3.0, data=[(1240, 1300)])) == [("modify", 1278, [(1240, 1278)], None)]
    assert shown(point(r, 4.0, data=[(1300, 1320)])) == [("modify", 1320, [(1278, 1320)], None)]


def test_a_truncate_up_into_a_hole_is_shown_at_once() -> None:
    r = setup()
    assert shown(point(r, 1.0, size=10000)) == [("modify", 10000, [(1240, 10000)], None)]


def test_unwritten_extents_wait_for_their_conversion() -> None:
    r = setup(size=4096)
    new = ((0, 100, 1, False), (1, 101, 1, True))
    assert point(r, 1.0, size=6000, extents=new) == []          # mapped unwritten: reads zeros until converted
    done = ((0, 100, 1, False), (1, 101, 1, False))
    assert shown(point(r, 2.0, size=6000, extents=done, data=[(4096, 6000)])) == \
        [("modify", 6000, [(4096, 6000)], None)]


def test_the_bound_releases_a_size_whose_data_never_comes() -> None:
    r = setup()
    point(r, 1.0, size=1278)
    assert point(r, 1.0 + HOLD_S - 0.5) == []
    assert r.hold_deadline == 1.0 + HOLD_S
    released = point(r, 1.0 + HOLD_S)
    assert shown(released) == [("modify", 1278, [(1240, 1278)], True)]
    assert '"unconfirmed":true' in released[0].to_json()
    assert Mutation.from_json(released[0].to_json()).unconfirmed is True


def test_the_end_of_a_replay_releases_everything() -> None:
    r = setup()
    point(r, 1.0, size=1278)
    r.deadline_passed = True
    assert shown(point(r, 2.0)) == [("modify", 1278, [(1240, 1278)], True)]


def test_a_truncate_below_the_shown_size_drops_the_hold() -> None:
    r = setup()
    point(r, 1.0, size=1278)
    assert shown(point(r, 2.0, size=100)) == [("truncate", 100, None, None)]
    assert not r.holds and not r.seen
    assert point(r, 3.0, size=150) == []                        # stale data seen before the truncate does not count


def test_a_deleted_file_leaves_no_hold() -> None:
    r = setup()
    point(r, 1.0, size=1278)
    change = Change(inodes={INO: None}, dirs={ROOT_INO: {}})
    r.apply(change, Context(seq=20, time=2.0))
    assert not r.holds and r.hold_deadline == float("inf")


def test_files_whose_data_is_not_attributed_never_wait() -> None:
    r = setup()
    change = Change(unheld={INO})
    node = r.tree.nodes[INO]
    change.inodes[INO] = replace(node, size=1278, names=[])
    events, _ = r.apply(change, Context(seq=1, time=1.0))
    assert [(e.kind, e.size) for e in events if e.kind == "modify"] == [("modify", 1278)]


def test_a_page_boundary_of_a_growing_file_is_not_a_resting_point() -> None:
    r = setup(size=8000, extents=((0, 100, 2, False),))
    point(r, 1.0, size=8100)                                    # an appending file: this size waits for its data
    two = ((0, 100, 2, False), (2, 102, 1, False))
    # writeback committed 8192 (its pages' end) while the file in memory was longer: real bytes, a torn line
    assert shown(point(r, 2.0, size=8192, extents=two, data=[(8000, 8192)])) == [("modify", 8100, [(8000, 8100)], None)]
    assert point(r, 3.0, size=8300, extents=two) == []          # the rest of the line, its data still in the page
    assert shown(point(r, 4.0, data=[(8192, 8300)])) == [("modify", 8300, [(8100, 8300)], None)]


def test_a_page_aligned_end_of_a_growing_file_shows_after_a_while() -> None:
    """...but only once it stayed the newest for HOLD_S (the page's rest comes at the next writeback, ~30 s later),
    and then as confirmed: its bytes were written."""
    r = setup(size=8000, extents=((0, 100, 2, False),))
    point(r, 1.0, size=8100)
    assert shown(point(r, 2.0, size=8192, data=[(8000, 8192)])) == [("modify", 8100, [(8000, 8100)], None)]
    assert r.hold_deadline == 2.0 + HOLD_S
    assert point(r, 2.0 + 12.0) == []  # longer than two jbd2 commits: still perhaps a cut inside a write()
    assert shown(point(r, 2.0 + HOLD_S)) == [("modify", 8192, [(8100, 8192)], None)]


def test_a_large_file_waiting_for_its_unwritten_extents_is_shown_at_their_conversion() -> None:
    """A file written and synced: its page-aligned size waits only for the conversion of its last extents, not
    for the page-boundary rule of an appended log (seen: a 256 MiB file held until the bound)."""
    r = setup(size=0, extents=())
    big = 64 * BS
    part = ((0, 100, 56, False), (56, 156, 8, True))
    assert point(r, 1.0, size=big, extents=part, data=[(0, 56 * BS)]) == []
    done = ((0, 100, 64, False),)
    assert shown(point(r, 1.1, size=big, extents=done, data=[(56 * BS, big)])) == \
        [("modify", big, [(0, big)], None)]


def test_a_logs_first_page_boundary_waits_even_with_no_held_size_before() -> None:
    """Seen with a TCG guest: the first size after the base's 2660 was writeback's cut at 4096 (a line runs on);
    the size shown ends inside a page, so the file is being appended to and the cut is not a resting point."""
    r = setup(size=2660, extents=((0, 100, 1, False),))
    two = ((0, 100, 1, False), (1, 101, 1, False))
    assert point(r, 1.0, size=4096, data=[(2660, 4096)]) == []
    assert shown(point(r, 6.0, size=5444, extents=two, data=[(4096, 5444)])) == \
        [("modify", 5444, [(2660, 5444)], None)]


def test_a_file_rewritten_to_a_page_aligned_size_is_shown_at_once() -> None:
    """Not an append: its head is written anew (`cp`, `>`), so its page-aligned size is no cut inside a write()."""
    r = setup(size=2660, extents=((0, 100, 1, False),))
    new = ((0, 200, 2, False),)
    assert shown(point(r, 1.0, size=8192, extents=new, data=[(0, 8192)])) == [("modify", 8192, [(0, 8192)], None)]


def test_bytes_seen_past_a_committed_size_count_when_a_later_size_covers_them() -> None:
    """The file's first block came with the size 100 and bytes up to 4096 (its newly mapped block held them:
    ExtHandler._mapped_data); the next commit grows the size to 6010 with a second block: shown at once."""
    r = setup(size=0, extents=())
    one = ((0, 100, 1, False),)
    assert shown(point(r, 1.0, size=100, extents=one, data=[(0, 4096)])) == [("modify", 100, [(0, 100)], None)]
    two = ((0, 100, 1, False), (1, 200, 1, False))
    assert shown(point(r, 2.0, size=6010, extents=two, data=[(4096, 6010)])) == \
        [("modify", 6010, [(100, 6010)], None)]

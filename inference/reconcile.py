"""A consistency point: new inode states and directory contents in, ordered Mutations out.

The file-system handler says what it re-read (changed inodes, full entry maps of changed directories,
data ranges written); this module diffs that against the shadow tree, pairs removed and added names by
inode into renames, orders the operations so that each one is valid when it is applied (a directory
exists before its children are created, is empty before it is removed, a name is free before it is
reused), applies them to the tree and emits one Mutation per operation.

Sizes wait for their bytes (`Reconciler._hold_sizes`): ext4 commits a larger i_size before the data it covers
(delayed allocation: an append that ends inside an allocated block moves the on-disk size at write() time while
the page waits ~30 s for writeback; new blocks may be unwritten extents until their I/O completes). The tree and
the stream show a file's size only as far as its bytes are real; the rest is held until the data comes, or a
bound passes, or the replay ends.
"""

from __future__ import annotations

import math
import operator
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from stat import S_IMODE

from inference.events import CHATTR_MASK, DIR_FIELDS, ErrorEvent, Kind, Mutation, flag_names, fs_path
from inference.names import all_valid, bad_name_reason
from inference.shadow import MAX_DEPTH, ROOT_INO, Node, ShadowTree

CREATE_KIND = {"file": "create", "dir": "mkdir", "symlink": "symlink"}
MAX_DROPPED = 1 << 16  # deleted inodes remembered (see Reconciler.dropped); the oldest go first
# A committed size whose bytes have not been seen written is shown anyway after this long (record time, seconds):
# longer than ext4's writeback of a dirty page (dirty_expire 30 s, flusher every 5 s, measured ~30-35 s).
HOLD_S = 40.0
# ext4's writeback also commits sizes at page boundaries (i_disksize = the end of the pages it mapped, while the
# file in memory is longer: measured, a size of 8192 inside a line of a log appended every 0.2 s). The rest of that
# page reaches the disk only at the inode's next writeback (dirty_expire, ~30 s later). For a file that is being
# appended to (the size shown, or a held size within HOLD_S, is not page-aligned: a write() of a log ended there;
# a large file written and synced has only page-aligned sizes waiting for unwritten extents), such a size is a resting
# point only once it stayed the newest for HOLD_S too; a larger size with its bytes supersedes it, and inside a
# larger size it is shown as usual.
PAGE = 4096
MAX_HELD = 1 << 16     # inodes with held sizes or data seen past their shown size; past it sizes are shown at once
MAX_SEEN_RANGES = 256  # data ranges remembered per inode past its shown size (the farthest go first)


@dataclass
class Context:
    """Where the events come from: stamped on each one."""

    seq: int
    time: float
    fs: str = ""
    vm: str = ""


@dataclass
class Change:
    inodes: dict[int, Node | None] = field(default_factory=dict)   # re-read inodes; None = free
    dirs: dict[int, dict[bytes, int]] = field(default_factory=dict)  # full new entries of re-read directories
    data: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # byte ranges written per inode
    generations: dict[int, bool] = field(default_factory=dict)  # ino -> True if reallocated (a new file)
    parents: dict[int, int] = field(default_factory=dict)  # re-read directory -> its '..'
    unheld: set[int] = field(default_factory=set)  # files whose data is not attributed (scope): sizes never wait


class _Op:
    """One name operation of a point. Compared and hashed by identity: each operation is its own (sets stay O(1)).
    A plain slotted class: a frozen dataclass's __init__ (object.__setattr__ per field) was ~1/3 of _pair."""

    __slots__ = ("kind", "ino", "src", "dst")

    def __init__(self, kind: str, ino: int, src: tuple[int, bytes] | None = None,
                 dst: tuple[int, bytes] | None = None) -> None:
        self.kind = kind   # rename, add, unlink
        self.ino = ino
        self.src = src
        self.dst = dst


@dataclass
class _Point:
    """One apply's name changes while they are decided: the candidates, the ones admitted, the counts."""

    tree: ShadowTree
    change: Change
    now: float
    settled: bool
    dirs: dict[int, dict[bytes, int]] = field(default_factory=dict)  # re-read listings, as they will count
    reborn: set[int] = field(default_factory=set)  # tree inodes whose number now holds a new file
    removed: list[tuple[int, bytes, int]] = field(default_factory=list)  # (dir, name, ino) candidates
    added: list[tuple[int, bytes, int]] = field(default_factory=list)
    ok_removed: list[tuple[int, bytes, int]] = field(default_factory=list)  # admitted at this point
    ok_added: list[tuple[int, bytes, int]] = field(default_factory=list)
    names_after: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # names each inode keeps
    retry: set[int] = field(default_factory=set)  # directories whose names wait: re-read them later

    def state(self, ino: int) -> Node | None:
        """The inode as it is now: its re-read record (None: freed), else the tree's."""
        return self.change.inodes[ino] if ino in self.change.inodes else self.tree.nodes.get(ino)

    def hold_added(self, d: int, n: bytes, i: int) -> None:
        """An admitted name waits after all: its directory is re-read later."""
        self.ok_added.remove((d, n, i))
        self.names_after[i] -= 1
        self.retry.add(d)


class _Paths:
    """ShadowTree.path and name_path, each directory walked up to the root once instead of once per entry, for as
    long as the names of no inode on a remembered walk change: the caller says when one may (`touch`)."""

    __slots__ = ("tree", "known", "walked")

    def __init__(self, tree: ShadowTree) -> None:
        self.tree = tree
        self.known: dict[int, bytes | None] = {}
        self.walked: set[int] = set()  # every inode a remembered path depends on (the last one looked up too)

    def dir(self, d: int) -> bytes | None:
        """tree.path(d), remembered."""
        try:
            return self.known[d]
        except KeyError:
            pass
        path = self.known[d] = self.tree.path(d)
        nodes, ino = self.tree.nodes, d
        for _ in range(MAX_DEPTH + 2):  # (the walk tree.path made: up the first names, to the root or a stop)
            self.walked.add(ino)
            node = nodes.get(ino)
            if ino == ROOT_INO or node is None or not node.names:
                break
            ino = node.names[0][0]
        return path

    def name_path(self, d: int, name: bytes) -> bytes | None:
        base = self.dir(d)
        return None if base is None else (base.rstrip(b"/") or b"") + b"/" + name

    def path(self, ino: int) -> bytes | None:
        """tree.path(ino): its parent's path and first name. (A parent with a path has no cycle through ino: the
        walk would come back to the parent. A path near tree.path's depth bound is walked by it.)"""
        node = self.tree.nodes.get(ino)
        if ino == ROOT_INO or node is None or not node.names:
            return self.tree.path(ino)
        parent, name = node.names[0]
        base = self.dir(parent)
        if base is not None and len(base) >= 2 * MAX_DEPTH:
            return self.tree.path(ino)
        return None if base is None else (base.rstrip(b"/") or b"") + b"/" + name

    def touch(self, ino: int) -> None:
        """The names (or the node) of `ino` are about to change or have changed: forget the paths that depend on it."""
        if ino in self.walked:
            self.known.clear()
            self.walked.clear()


def _live(node: Node | None) -> bool:
    return node is not None and node.links > 0


def _event(ctx: Context, kind: str, path: bytes | None, node: Node | None, **kw) -> Mutation:
    kind = _KIND_OF[kind]
    if node is None:
        m = Mutation(ctx.seq, ctx.time, kind, fs_path(path or b"?"), ctx.vm, ctx.fs)
    else:  # (one positional call, in Mutation's field order: a call and a dozen setattr cost twice as much)
        t = node.type
        m = Mutation(ctx.seq, ctx.time, kind, fs_path(path or b"?"), ctx.vm, ctx.fs, None, node.ino, t, node.size,
                     S_IMODE(node.mode), node.uid, node.gid, node.mtime_ns / 1e9, node.mtime_ns, node.ctime_ns,
                     node.atime_ns, node.blocks, node.links, node.rdev if t in _DEVICES else None,
                     flag_names(node.flags) if node.flags & CHATTR_MASK else None)
        if t == "symlink" and node.target is not None:
            m.target = fs_path(node.target)
    for k, v in kw.items():
        setattr(m, k, v)
    return m


_DEVICES = ("chardev", "blockdev")
_KIND_OF = {k.value: k for k in Kind}


class Reconciler:
    """Turns one Change into events on one ShadowTree; remembers names it must look at again, and sizes whose
    bytes have not come yet."""

    # Class defaults: also for reconcilers unpickled from indexes made before sizes waited.
    holds: dict[int, list[tuple[int, float]]] | None = None  # ino -> committed sizes past the shown one, ascending,
    #                                                          each with the record time it was first committed
    seen: dict[int, list[tuple[int, int]]] | None = None  # ino -> byte ranges past its shown size that data writes
    #                                                       (or newly mapped blocks) brought, merged, ascending
    hold_deadline = math.inf  # record time at which the oldest held size is released
    quiet: set[int] | None = None  # inodes whose atime, blocks or flags changed with no event (a read moved atime):
    #                                 the view takes them when the stream is quiet (EngineView.take_quiet, which
    #                                 starts the collection: without a view nothing accumulates)
    appending: dict[int, float] | None = None  # ino -> record time it last had a held size (see PAGE)
    block_size = 4096         # the file system's (the handler sets it)

    # How long (guest-write time) a half-written directory change may wait for its other half: ext2 writes
    # dirty buffers back within dirty_expire (30 s) in any order. Past it, the names are taken as they are.
    MAX_WAIT = 35.0

    def __init__(self, tree: ShadowTree) -> None:
        self.tree = tree
        self.waiting: dict[int, float] = {}  # dir ino -> time its change began to wait
        self.deadline_passed = False  # set at the end of a replay: nothing more will come
        # Names of a deleted file that its directory still lists, while its inode number already holds a new
        # file (ext2 wrote the inode first): (dir, name) -> (ino, since when).
        self.stale: dict[tuple[int, bytes], tuple[int, float]] = {}
        # Inodes that left the tree, with the (generation, ctime) they had: a name that points at one whose
        # record is still that is a new file whose record has not come yet, not the old file (oldest first).
        self.dropped: dict[int, tuple[int, int, float]] = {}
        self.reread: set[int] = set()  # inodes whose record was re-read since the last settled point
        self.holds, self.seen, self.appending = {}, {}, {}

    def apply(self, change: Change, ctx: Context, settled: bool = False) -> tuple[list[Mutation], set[int]]:
        """Events for `change`, and the directories to re-read at the next consistency point. `settled`: the
        file system has been quiet for a while (a writeback burst is over).

        Names are decided in passes; each may hold some back (their directories are re-read later): names of
        reused numbers, entries ahead of their inodes or parents, second names, ambiguous moves, half renames.
        """
        refused = self._refuse_bad_names(change, ctx)
        grown, unconfirmed = self._hold_sizes(change, ctx)
        self._forget_old(ctx.time)
        p = _Point(self.tree, change, ctx.time, settled)
        p.dirs = {d: self._unstale(d, entries, settled, p.retry) for d, entries in change.dirs.items()}
        p.reborn = {ino for ino, flag in change.generations.items() if flag and ino in self.tree.nodes}
        self._hold_moved_dirs(p)
        for d, entries in p.dirs.items():
            old = self.tree.children.get(d, {})
            p.removed += [(d, n, i) for n, i in old.items() if entries.get(n) != i]
            p.added += [(d, n, i) for n, i in entries.items() if old.get(n) != i]
        self._reborn_names(p)
        self._count_names(p)
        self._admit_added(p)
        self._hold_second_names(p)
        self._admit_removed(p, self._hold_unsure(p))
        for d in p.retry:
            self.waiting.setdefault(d, ctx.time)
        for d in change.dirs:
            if d not in p.retry:
                self.waiting.pop(d, None)

        created: set[int] = set()
        deferred_add = set(p.added) - set(p.ok_added)
        deferred_rem = set(p.removed) - set(p.ok_removed)
        # Inodes with names still waiting: their record is ahead of their names in the tree.
        behind = {i for _, _, i in deferred_add | deferred_rem}
        ops = self._pair(p.ok_removed, p.ok_added, p.reborn)
        events = refused + self._schedule(ops, change, ctx, created, p.reborn, behind)
        # Settle: whatever the order, the tree now holds the directories as re-read, except for the
        # names that wait for their other half.
        kept_out: dict[int, list[tuple[bytes, int]]] = defaultdict(list)  # per directory, in deferred_rem's order
        for dd, n, i in deferred_rem:
            kept_out[dd].append((n, i))
        for d, entries in p.dirs.items():
            # (with nothing waiting, the listing as it is: no tuple per entry of every re-read directory)
            target = {n: i for n, i in entries.items() if (d, n, i) not in deferred_add} if deferred_add \
                else dict(entries)
            for n, i in kept_out.get(d, ()):
                target.setdefault(n, i)
            self._settle_dir(d, target)
        events += self._attributes(change, ctx, created, p.reborn, grown, unconfirmed)
        self._parents(events)
        # A record re-read while its names agreed with it: at the end of the burst its ctime becomes the one
        # a later rename must move (see `_hold_unsure`); inside the burst it may still be ahead of its names.
        self.reread.update(i for i, node in change.inodes.items() if node is not None)
        if settled:
            for i in self.reread - behind:
                if (node := self.tree.nodes.get(i)) is not None:
                    node.name_ctime_ns = node.ctime_ns
            self.reread.clear()
        return events, p.retry

    # -- the passes of apply, in order

    def _refuse_bad_names(self, change: Change, ctx: Context) -> list[Mutation]:
        """The last gate before names reach the tree: a handler applies the name policy (inference/names.py) and
        reports what it refuses; a name that got here anyway ('', '.', '..', '/' or NUL in it) is dropped too."""
        events: list[Mutation] = []
        for d, entries in change.dirs.items():
            if all_valid(entries.keys()):
                continue
            bad = [n for n in entries if bad_name_reason(n) is not None]
            for n in bad:
                ino = entries.pop(n)
                events.append(ErrorEvent(seq=ctx.seq, time=ctx.time, kind=Kind.ERROR, fs=ctx.fs, vm=ctx.vm,
                                       path=fs_path(self.tree.path(d) or b"?"),
                                       ino=d, message=f"bad name left out: directory inode {d}, entry inode {ino}, "
                                       f"name (hex) '{n.hex()}': {bad_name_reason(n)} (not refused by the handler)",
                                       extra={"dir_ino": d, "entry_ino": ino, "name_hex": n.hex()}))
        return events

    def _past(self, since: float, now: float) -> bool:
        return self.deadline_passed or now - since > self.MAX_WAIT

    def _expired(self, d: int, now: float) -> bool:
        """Has this directory's change waited long enough to be taken as it is?"""
        return self._past(self.waiting.get(d, now), now)

    def _forget_old(self, now: float) -> None:
        while self.dropped and (self._past(next(iter(self.dropped.values()))[2], now)
                                or len(self.dropped) > MAX_DROPPED):
            del self.dropped[next(iter(self.dropped))]
        for key, (_, since) in list(self.stale.items()):
            if self._past(since, now):
                del self.stale[key]  # its directory was not readable since: the listing counts again

    def _hold_moved_dirs(self, p: _Point) -> None:
        """A directory whose '..' is not its parent in the tree was moved, or its number now holds a new
        directory, and the entries or the inode that tell which have not come yet: its entries wait."""
        for d, parent in p.change.parents.items():
            node = self.tree.nodes.get(d)
            if d != ROOT_INO and node is not None and node.names and node.names[0][0] != parent \
                    and d not in p.reborn and not self._expired(d, p.now):
                p.dirs[d] = dict(self.tree.children.get(d, {}))
                p.retry.add(d)

    def _reborn_names(self, p: _Point) -> None:
        """A new generation proves the old file deleted, whatever its directories still list. A name still
        listed is stale (its directory block comes later) or the new file's (rm a; touch a: the block may
        never change): it waits until the writeback burst is over (`settled`), then counts as the new file's."""
        for ino in p.reborn:
            for d, n in self.tree.nodes[ino].names:
                if d in p.dirs and p.dirs[d].get(n) != ino:
                    continue  # already a removal
                p.removed.append((d, n, ino))
                if p.settled:
                    p.added.append((d, n, ino))
                else:
                    self.stale[(d, n)] = (ino, p.now)
                    p.dirs.get(d, {}).pop(n, None)
                    p.retry.add(d)

    def _count_names(self, p: _Point) -> None:
        """How many names each touched inode keeps after the removals (added ones count as they are admitted)."""
        for ino in set(p.change.inodes) | {r[2] for r in p.removed} | {a[2] for a in p.added}:
            if (node := self.tree.nodes.get(ino)) is not None:
                p.names_after[ino] = 0 if ino in p.reborn else len(node.names)
        for _, _, i in p.removed:
            if i not in p.reborn:
                p.names_after[i] -= 1

    def _admit_added(self, p: _Point) -> None:
        """Names must agree with inodes (ext2 writes them back in any order): an entry whose inode is not live
        yet waits. An entry counts only where its directory is reachable from the root, now or through entries
        of this same point (a new tree arrives top-down); the rest waits for its parent's entry."""
        live = [(d, n, i) for d, n, i in p.added if _live(p.state(i)) and
                not self._gone(i, p.state(i))]
        admitted = set(live)  # (a list here made this quadratic: 0.2 s for 3,000 creates in one point)
        for d, n, i in p.added:
            if (d, n, i) not in admitted and not self._expired(d, p.now):
                p.retry.add(d)  # past the deadline: stale, ignore
        paths = _Paths(self.tree)
        reachable = {d for d, _, _ in live if d == ROOT_INO or (paths.dir(d) is not None and d not in p.reborn)}
        grew = True
        while grew:
            grew = False
            for d, _n, i in live:
                if d in reachable and i not in reachable and \
                        (p.state(i) or self.tree.nodes[i]).type == "dir":
                    reachable.add(i)
                    grew = True
        for d, n, i in live:
            if d not in reachable:
                if not self._expired(d, p.now):
                    p.retry.add(d)
                continue
            p.ok_added.append((d, n, i))
            p.names_after[i] += 1

    def _hold_second_names(self, p: _Point) -> None:
        """A second name for an inode that keeps its old one is a hard link only if the link count says so;
        otherwise (and always for a directory) it is the first half of a rename whose other half is late."""
        removed_inos = {i for _, _, i in p.removed}
        for d, n, i in list(p.ok_added):
            node, st = self.tree.nodes.get(i), p.state(i)
            if node is None or not node.names or i in p.reborn or i in removed_inos:
                continue
            if (node.type == "dir" or st.links < p.names_after[i]) and not self._expired(d, p.now):
                p.hold_added(d, n, i)

    def _hold_unsure(self, p: _Point) -> list[tuple[int, bytes, int]]:
        """A name that moved to an inode whose own record was not re-read is ambiguous: a rename (which also
        rewrites the inode's ctime) or a delete and a create reusing the number (a new generation). ext2 writes
        the inode back later: both halves wait for it. A record re-read in this burst already tells.
        Returns the removals left to decide."""
        moved = {i for _, _, i in p.removed} & {i for _, _, i in p.ok_added}
        unsure = {i for i in moved if i not in p.reborn and i in self.tree.nodes and i not in self.reread
                  and (p.state(i) or self.tree.nodes[i]).ctime_ns == self.tree.nodes[i].name_ctime_ns}
        if not unsure:
            return p.removed
        hold = {(d, n, i) for d, n, i in p.removed + p.ok_added if i in unsure and not self._expired(d, p.now)}
        p.ok_added = [a for a in p.ok_added if a not in hold]
        p.retry.update(d for d, _, _ in hold)
        return [r for r in p.removed if r not in hold]

    def _admit_removed(self, p: _Point, removed: list[tuple[int, bytes, int]]) -> None:
        """A live inode that lost its only name, or a file that lost a name while its link count did not drop:
        the first half of a rename whose other half has not reached the disk yet (ext2). A name that now points
        at another inode while the old one's removal waits waits too (else the old file would leave without its
        delete), and so may the removals its inode counted on: repeat until nothing more waits."""
        while True:
            p.ok_removed = []
            for d, n, i in removed:
                st = p.state(i)
                half = _live(st) and (p.names_after[i] <= 0 or (st.type != "dir" and p.names_after[i] < st.links))
                if i not in p.reborn and half and not self._expired(d, p.now):
                    p.retry.add(d)
                    continue
                p.ok_removed.append((d, n, i))
            waiting_out = {(d, n) for d, n, _ in set(p.removed) - set(p.ok_removed)}
            late = [a for a in p.ok_added if a[:2] in waiting_out and not self._expired(a[0], p.now)]
            if not late:
                return
            for a in late:
                p.hold_added(*a)

    def _unstale(self, d: int, entries: dict[bytes, int], settled: bool, retry: set[int]) -> dict[bytes, int]:
        """A directory's entries without the stale names it still lists; a stale name is forgotten once the
        listing no longer has it, or once writeback has settled (then the listing is the new file's)."""
        if not self.stale:
            return entries
        entries = dict(entries)
        for (sd, n), (ino, _) in list(self.stale.items()):
            if sd != d:
                continue
            if entries.get(n) != ino or settled:
                del self.stale[(sd, n)]
            else:
                del entries[n]
                retry.add(d)
        return entries

    def _gone(self, ino: int, node: Node) -> bool:
        """Is this record the one of a file that already left the tree (its new record is still to come)?"""
        was = self.dropped.get(ino)
        return was is not None and ino not in self.tree.nodes and (node.gen, node.ctime_ns) == was[:2]

    def _drop(self, ino: int, now: float) -> None:
        self._unhold(ino)
        node = self.tree.drop_node(ino)
        if node is not None:
            self.dropped.pop(ino, None)
            self.dropped[ino] = (node.gen, node.ctime_ns, now)

    # -- sizes that wait for their bytes

    def _hold_sizes(self, change: Change, ctx: Context) -> tuple[dict[int, int], set[int]]:
        """Decide each touched file's shown size before anything is applied: the re-read record's size is lowered
        to it (so creates, the tree, reads through it and every event show it), and a held size that its data or
        the bound released is set on the tree's node (returned in `grown`, with the size shown before).

        The rule, byte-exact for an append-only file written through a real kernel's page cache. Bytes past the
        shown size up to a committed size are real when they are
        - in a hole (no extent): they read as zeros, which is what the file holds there (a truncate up, a seek);
        - in an initialized extent, and a data write changed them: the engine's changed span of a write record
          (exact to the byte), attributed through the block map, past the shown size, whenever it came (data may
          come before its size: fsync and sync write data, then commit) -- `seen`;
        - in blocks this file's map newly maps initialized (a new file's, or _new_blocks of a re-read map), up to
          the size committed with them and, in the block with the end of the file, to its last nonzero byte
          (ExtHandler._mapped_data): data=ordered writes a new block's data before the commit that maps it.
        Bytes in an unwritten (uninit) extent are not real: they read as zeros until the conversion that follows
        their I/O (which maps them initialized: the last rule). A partial tail block written earlier is in an
        initialized extent: its new bytes need their own data write (ext4's delalloc append).
        The shown size is the largest committed size (a size the file had at a write()'s end) whose bytes are all
        real: never a size inside a write. A committed size whose last byte is in a hole did not come from a
        write() into allocated blocks (ext4 moves i_disksize at write() time only when the write ends in an
        allocated block, and at writeback only over the blocks it maps): a truncate up or a sparse extension is
        shown at once (one that ends inside the last allocated block cannot be told from a pending append: it
        waits for the bound). A page-aligned size of a file being appended to may be writeback's cut inside a
        write() (see PAGE): it is not a resting point until it stayed the newest that long. A size
        committed HOLD_S ago (record time) or more is shown whatever its bytes, and so is everything at the end
        of a replay (deadline_passed): the modify carries "unconfirmed": true."""
        holds = self.holds if self.holds is not None else {}
        seen = self.seen if self.seen is not None else {}
        appending = self.appending if self.appending is not None else {}
        self.holds, self.seen, self.appending = holds, seen, appending
        now, release_all = ctx.time, self.deadline_passed
        expired = release_all or self.hold_deadline <= now
        grown: dict[int, int] = {}
        unconfirmed: set[int] = set()
        cands = {ino for ino, n in change.inodes.items() if n is None or n.type == "file"} | set(change.data)
        if expired:
            cands |= set(holds)
        bs = self.block_size
        for ino in sorted(cands):
            node = self.tree.nodes.get(ino)
            if ino in change.inodes:
                new = change.inodes[ino]
                if new is None or new.type != "file":
                    self._unhold(ino)
                    continue
            elif node is None:  # data for a file whose names have not come yet: kept for its create
                self._see(ino, change.data.get(ino, ()), 0)
                continue
            elif node.type != "file":
                self._unhold(ino)
                continue
            else:
                new = None
            fresh = node is None or bool(change.generations.get(ino))  # a new file: nothing of it shown yet
            if change.generations.get(ino):
                self._unhold(ino)
            cur = new or node
            shown = 0 if fresh else node.size
            steps = holds.get(ino, [])
            committed = new.size if new is not None else (steps[-1][0] if steps else node.size)
            if ino in change.unheld or (ino not in holds and ino not in seen and len(holds) + len(seen) >= MAX_HELD):
                self._unhold(ino)
                best = committed
            elif committed <= shown and not steps:  # nothing grows, nothing waits: the common case, cheap
                best = committed
                if ino in seen and committed < shown:
                    del seen[ino]  # truncated: what was seen past the old end is gone
                self._see(ino, change.data.get(ino, ()), shown)
            else:
                top = steps[-1][0] if steps else shown
                if committed < top:  # truncated: what was seen past the new end is gone
                    steps = [s for s in steps if s[0] < committed]
                    if ino in seen:
                        seen[ino] = _merge(seen[ino], committed)
                self._see(ino, change.data.get(ino, ()), shown)
                if committed > (steps[-1][0] if steps else shown):
                    steps.append((committed, now))
                end = _real_end(shown, committed, cur.extents, seen.get(ino, ()), bs)
                best = min(shown, committed)
                # being appended to: the end shown is inside a page (a write() ended there) and nothing before it
                # changes (a rewrite writes or maps its head anew), or a held size was inside a page lately
                growing = (shown % PAGE != 0 and all(a >= shown for a, _ in change.data.get(ino, ()))) or \
                    now - appending.get(ino, -math.inf) < HOLD_S
                for size, since in steps:
                    if growing and size % PAGE == 0 and (size < steps[-1][0] or now - since < HOLD_S):
                        continue  # perhaps writeback's page boundary inside a write(): not a resting point
                    if size <= end or _in_hole(size - 1, cur.extents, bs):
                        best = max(best, size)
                late = [size for size, since in steps if release_all or now - since >= HOLD_S]
                if late and max(late) > best:
                    best = max(late)
                    unconfirmed.add(ino)
                steps = [s for s in steps if s[0] > best]
                if steps:
                    holds[ino] = steps
                else:
                    holds.pop(ino, None)
                if any(size % PAGE for size, _ in steps):  # a log's write() ends: not a large file's last page
                    appending.pop(ino, None)  # (re-inserted: the oldest stay first, for the bound below)
                    appending[ino] = now
                    while len(appending) > MAX_HELD:
                        del appending[next(iter(appending))]
                if ino in seen:
                    kept = [(max(a, best), b) for a, b in seen[ino] if b > best]
                    if kept:
                        seen[ino] = kept
                    else:
                        del seen[ino]
            if new is not None:
                new.size = best
            elif best != node.size:
                grown[ino] = node.size
                node.size = best
        self.hold_deadline = min((s[0][1] + HOLD_S for s in holds.values()), default=math.inf)
        return grown, unconfirmed

    def _see(self, ino: int, ranges: list[tuple[int, int]], shown: int) -> None:
        """Remember data ranges past the shown size (bounded: the farthest ranges go first)."""
        past = [(max(a, shown), b) for a, b in ranges if b > shown]
        if not past or (ino not in self.seen and len(self.seen) + len(self.holds) >= MAX_HELD):
            return
        merged = _merge(self.seen.get(ino, []) + past, math.inf)
        self.seen[ino] = merged[:MAX_SEEN_RANGES]

    def _unhold(self, ino: int) -> None:
        for held in (self.holds, self.seen, self.appending):
            if held:
                held.pop(ino, None)

    # -- pairing and ordering

    @staticmethod
    def _pair(removed, added, reborn) -> list[_Op]:
        rem_by: dict[int, list] = defaultdict(list)
        add_by: dict[int, list] = defaultdict(list)
        for r in removed:
            rem_by[r[2]].append(r)
        for a in added:
            add_by[a[2]].append(a)
        ops: list[_Op] = []
        for ino in list(rem_by):
            if ino in reborn:
                continue
            while rem_by[ino] and add_by.get(ino):
                (d1, n1, _), (d2, n2, _) = rem_by[ino].pop(0), add_by[ino].pop(0)
                ops.append(_Op("rename", ino, (d1, n1), (d2, n2)))
        for ino, rs in rem_by.items():
            ops += [_Op("unlink", ino, src=(d, n)) for d, n, _ in rs]
        for ino, adds in add_by.items():
            for d, n, _ in adds:
                ops.append(_Op("add", ino, dst=(d, n)))
        return ops

    def _schedule(self, ops: list[_Op], change: Change, ctx: Context, created: set[int],
                  reborn: set[int], behind: set[int]) -> list[Mutation]:
        tree = self.tree
        events: list[Mutation] = []
        pending = dict.fromkeys(ops)  # an ordered set
        victims = {op.src: op for op in ops if op.kind == "unlink"}
        done: set[_Op] = set()
        paths = _Paths(tree)  # (run touches it for every inode whose names it changes, before and after)

        def dir_exists(d: int) -> bool:
            if d == ROOT_INO:
                return True
            node = tree.nodes.get(d)
            return node is not None and node.type == "dir" and paths.dir(d) is not None

        def ready(op: _Op, force: bool) -> bool:
            if op.kind == "unlink":
                node = tree.nodes.get(op.ino)
                last = node is None or len(node.names) <= 1 or op.ino in reborn
                return force or not (node and node.type == "dir" and last and tree.children.get(op.ino))
            d, n = op.dst
            if not force and (not dir_exists(d) or (d in reborn and d not in created)):
                return False  # (a reused directory number: its new entries wait for the new directory)
            old = tree.nodes.get(op.ino)
            if op.kind == "add" and op.ino in reborn and old is not None and old.names and not force:
                return False  # the old file of this inode number must be gone first
            if op.kind == "rename" and op.src and tree.lookup(*op.src) != op.ino:
                return force
            occupant = tree.lookup(d, n)
            if occupant is None or occupant == op.ino:
                return True
            victim = victims.get((d, n))
            if op.kind == "rename" and victim is not None and victim not in done:
                return True  # rename over an existing name: it replaces the victim
            return force

        def run(op: _Op) -> None:
            done.add(op)
            if op.src:
                self._entries_touched(op.src[0])
            if op.dst:
                self._entries_touched(op.dst[0])
            paths.touch(op.ino)
            try:
                change_names(op)
            finally:
                paths.touch(op.ino)

        def change_names(op: _Op) -> None:
            if op.kind == "unlink":
                events.extend(self._unlink(op, change, ctx, reborn))
                return
            d, n = op.dst
            occupant = tree.lookup(d, n)
            if occupant is not None and occupant != op.ino:
                victim = victims.get((d, n))
                if victim is not None:
                    done.add(victim)
                    pending.pop(victim, None)
                paths.touch(occupant)
                self._drop_name(d, n, occupant, ctx.time)
            if op.kind == "rename":
                old_path = paths.name_path(*op.src)
                tree.remove_name(*op.src)
                tree.add_name(d, n, op.ino)
                paths.touch(op.ino)
                self._named(op.ino, change, behind)
                events.append(_event(ctx, "rename", paths.name_path(d, n), self._node(op.ino, change),
                                     old_path=fs_path(old_path or b"?"), parent={"ino": d},
                                     old_parent={"ino": op.src[0]} if op.src[0] != d else None))
                return
            node = tree.nodes.get(op.ino)
            if node is None or (op.ino in reborn and op.ino not in created):
                new = change.inodes.get(op.ino) or node
                if new is None:
                    return
                new = _copy(new)
                new.names = ()
                tree.add_node(new)
                created.add(op.ino)
                tree.add_name(d, n, op.ino)
                paths.touch(op.ino)
                self._named(op.ino, change, behind)
                kind = CREATE_KIND.get(new.type, "mknod")
                events.append(_event(ctx, kind, paths.name_path(d, n), self._node(op.ino, change), parent={"ino": d}))
                return
            first = paths.path(op.ino)
            tree.add_name(d, n, op.ino)
            paths.touch(op.ino)
            self._named(op.ino, change, behind)
            events.append(_event(ctx, "link", paths.name_path(d, n), self._node(op.ino, change),
                                 target=fs_path(first or b"?"), parent={"ino": d}))

        order = {"unlink": 2, "rename": 0, "add": 1}
        for force in (False, True):
            progress = True
            while pending and progress:
                progress = False
                for op in sorted(pending, key=lambda o: (order[o.kind], self._depth(o, paths))):
                    if op in done or op not in pending:
                        continue
                    if ready(op, force):
                        del pending[op]
                        run(op)
                        progress = True
                        if force:
                            break
        return events

    def _named(self, ino: int, change: Change, behind: set[int]) -> None:
        """Its names now match its record (unless some still wait: then the record stays ahead of them)."""
        if ino not in behind:
            node = self.tree.nodes[ino]
            node.name_ctime_ns = (change.inodes.get(ino) or node).ctime_ns

    def _entries_touched(self, *dirs: int) -> None:
        for d in dirs:
            if (node := self.tree.nodes.get(d)) is not None:
                node.entries_changed = True

    @staticmethod
    def _depth(op: _Op, paths: _Paths) -> int:
        where = op.dst or op.src
        base = paths.dir(where[0]) if where else None  # (name_path's slashes, without making the path)
        depth = 0 if base is None else (base.rstrip(b"/") or b"").count(b"/") + 1 + where[1].count(b"/")
        return -depth if op.kind == "unlink" else depth

    def _node(self, ino: int, change: Change) -> Node | None:
        return change.inodes.get(ino) or self.tree.nodes.get(ino)

    def _unlink(self, op: _Op, change: Change, ctx: Context, reborn: set[int]) -> list[Mutation]:
        tree = self.tree
        d, n = op.src
        path = tree.name_path(d, n)
        old = tree.nodes.get(op.ino)
        events: list[Mutation] = []
        if old is not None and old.type == "dir" and len(old.names) <= 1 and tree.children.get(op.ino):
            # The directory is gone, so its entries are too, even if its freed blocks still list them
            # (ext2 need not write back a directory it deletes).
            for name, child in sorted(tree.children[op.ino].items()):
                events += self._unlink(_Op("unlink", child, src=(op.ino, name)), change, ctx, reborn)
        tree.remove_name(d, n)
        gone = old is None or not old.names
        kind = "rmdir" if old is not None and old.type == "dir" and gone else "delete"
        ev = _event(ctx, kind, path, old, parent={"ino": d})
        events.append(ev)
        if gone:
            ev.links = 0
            self._drop(op.ino, ctx.time)
        else:
            new = change.inodes.get(op.ino)
            ev.links = new.links if new is not None else len(old.names)
        return events

    def _drop_name(self, d: int, n: bytes, ino: int, now: float) -> None:
        self.tree.remove_name(d, n)
        node = self.tree.nodes.get(ino)
        if node is not None and not node.names:
            self._drop(ino, now)

    def _settle_dir(self, d: int, entries: dict[bytes, int]) -> None:
        tree = self.tree
        current = dict(tree.children.get(d, {}))
        for n, i in current.items():
            if entries.get(n) != i:
                tree.remove_name(d, n)
        for n, i in entries.items():
            if current.get(n) != i and i in tree.nodes:
                tree.add_name(d, n, i)

    def _parents(self, events: list[Mutation]) -> None:
        """Each entry event names its directory (`parent`, `old_parent`) as it is at the end of this point: a
        directory's size, blocks, link count and times move with its entries, at the point its entries do, and
        the guest raises no event of its own for them, so the view takes them from the entry's event (a
        directory gone by the end of the point is named by none)."""
        nodes = self.tree.nodes
        for m in events:
            if m.parent is not None:
                m.parent = _dir_ref(nodes.get(m.parent["ino"]))
            if m.old_parent is not None:
                m.old_parent = _dir_ref(nodes.get(m.old_parent["ino"]))

    # -- attributes, content, xattrs

    def _attributes(self, change: Change, ctx: Context, created: set[int], reborn: set[int],
                    grown: dict[int, int], unconfirmed: set[int]) -> list[Mutation]:
        """Content, attribute and xattr events. `grown`: files whose held size `_hold_sizes` let grow without a
        re-read record (ino -> the size shown before); `unconfirmed`: files shown past the bytes seen written."""
        tree = self.tree
        events: list[Mutation] = []
        touched = set(change.inodes) | set(change.data) | set(grown)
        flag = {"unconfirmed": True}
        paths = _Paths(tree)  # (no name changes here)
        for ino in sorted(touched):
            node = tree.nodes.get(ino)
            new = change.inodes.get(ino, node)
            path = paths.path(ino) if node is not None else None
            if node is None or new is None or path is None:
                continue  # not (yet) reachable from the root: its create will carry what it has
            if ino in reborn and ino not in created:
                continue  # a new file under an old number whose names have not reached the disk: not the old file
            if ino in created:
                _update(node, new)
                if new.type == "file" and new.size > 0:
                    events.append(_event(ctx, "modify", path, node, ranges=[(0, new.size)],
                                         **(flag if ino in unconfirmed else {})))
                if new.xattrs:
                    events.append(_event(ctx, "xattr", path, node, xattr={k: v.hex() for k, v in new.xattrs.items()}))
                continue
            data = change.data.get(ino)
            ranges = _merge(data, new.size) if data else []
            old_size, old = grown.get(ino, node.size), _copy(node)
            _update(node, new)
            content = False
            if new.size < old_size:
                events.append(_event(ctx, "truncate", path, node, old_size=old_size))
                content = True
            elif new.size > old_size and new.type == "file":
                ranges = _merge(ranges + [(old_size, new.size)], new.size)
            if ranges and new.type == "file":
                events.append(_event(ctx, "modify", path, node, ranges=ranges,
                                     old_size=old_size if old_size != new.size else None,
                                     **(flag if ino in unconfirmed else {})))
                content = True
            # A directory's mtime moves with its entries, and those are events of their own (the entry and
            # the directory's record may reach the disk at different points): a directory's new mtime is an
            # attrib event only when no entry of it changed since its last one (touch -d on a directory).
            by_entries = node.entries_changed and new.mtime_ns == new.ctime_ns  # touch -d leaves ctime alone
            if new.type == "dir" and old.mtime_ns != new.mtime_ns:
                node.entries_changed = False
            # atime alone moves on reads (no event in the guest either); with ctime it was set (touch -a)
            atime_set = old.atime_ns != new.atime_ns and old.ctime_ns != new.ctime_ns and not content \
                and old.links == new.links and node.name_ctime_ns != new.ctime_ns
            if (old.flags ^ new.flags) & CHATTR_MASK:  # chattr: an attrib event naming the flags before and after
                events.append(_event(ctx, "attrib", path, node, flags=flag_names(new.flags),
                                     old_flags=flag_names(old.flags)))
            elif (old.mode, old.uid, old.gid) != (new.mode, new.uid, new.gid) or atime_set or (
                    old.mtime_ns != new.mtime_ns and not content and not (new.type == "dir" and by_entries)):
                events.append(_event(ctx, "attrib", path, node, **_olds(old, new)))
            if (old.xattrs or {}) != (new.xattrs or {}):
                diff = {k: v.hex() for k, v in (new.xattrs or {}).items() if (old.xattrs or {}).get(k) != v}
                diff.update({k: None for k in (old.xattrs or {}) if k not in (new.xattrs or {})})
                events.append(_event(ctx, "xattr", path, node, xattr=diff))
            if self.quiet is not None and (not events or events[-1].ino != ino) and new.type != "dir" and (
                    old.atime_ns, old.blocks, old.flags) != (new.atime_ns, new.blocks, new.flags):
                self.quiet.add(ino)
        return events


def _olds(old: Node, new: Node) -> dict:
    """An attrib event's old_* fields: the attributes before, those that changed (mirrorfs-events(5))."""
    out = {f"old_{k}": v for k, v, now in (("mode", stat.S_IMODE(old.mode), stat.S_IMODE(new.mode)),
                                           ("uid", old.uid, new.uid), ("gid", old.gid, new.gid)) if v != now}
    if new.type == "symlink" and old.target is not None and old.target != new.target:
        out["old_target"] = fs_path(old.target)
    return out


_DIR_FIELDS = operator.attrgetter(*DIR_FIELDS)


def _dir_ref(node: Node | None) -> dict[str, int] | None:
    """An event's `parent` or `old_parent`: the directory's DIR_FIELDS (None: gone, or not a directory)."""
    return None if node is None or node.type != "dir" else dict(zip(DIR_FIELDS, _DIR_FIELDS(node), strict=True))


_ALL_FIELDS = operator.attrgetter(*Node.__slots__)  # (names last: a tuple, shared safely by a copy)
_TAKEN = tuple(f for f in Node.__slots__ if f not in ("names", "name_ctime_ns", "entries_changed"))


def _assigner(fields: tuple[str, ...]):
    """node.f = new.f for each field, as straight-line code (as dataclasses makes __init__): a setattr loop over
    zip cost 114k calls in the meta replay."""
    ns: dict = {}
    exec("def assign(node, new):\n" + "".join(f"    node.{f} = new.{f}\n" for f in fields), ns)  # noqa: S102
    return ns["assign"]


_assign_taken = _assigner(_TAKEN)


def _copy(node: Node) -> Node:
    return Node(*_ALL_FIELDS(node))  # (attrgetter in C: a per-field getattr loop was 1/10 of the meta replay)


def _update(node: Node, new: Node) -> None:
    """Take the re-read attributes; names and the name bookkeeping stay the tree's."""
    if node is not new:
        _assign_taken(node, new)


def _real_end(start: int, end: int, extents: tuple, seen, bs: int) -> int:
    """How far from `start` (towards `end`) the bytes are real (see Reconciler._hold_sizes): holes, and initialized
    extents where `seen` (merged, ascending byte ranges) covers them; an unwritten extent stops it."""
    pos, k, seen = start, 0, list(seen)
    for lg, _, n, un in sorted(extents):
        lo, hi = lg * bs, (lg + n) * bs
        if hi <= pos:
            continue
        if lo >= end:
            break
        pos = max(pos, lo)  # a hole before this extent: real (zeros)
        if un:
            return pos
        while pos < min(hi, end):
            while k < len(seen) and seen[k][1] <= pos:
                k += 1
            if k == len(seen) or seen[k][0] > pos:
                return pos
            pos = min(seen[k][1], hi)
        if pos >= end:
            return end
    return end


def _in_hole(byte: int, extents: tuple, bs: int) -> bool:
    """Is this byte of the file in no extent (a hole)?"""
    block = byte // bs
    return not any(lg <= block < lg + n for lg, _, n, _ in extents)


def _merge(ranges: list[tuple[int, int]], size: float) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted((max(a, 0), min(b, size)) for a, b in ranges):
        if a >= b:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]

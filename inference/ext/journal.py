"""jbd2 transactions from a stream of journal-block writes (sans-I/O: no files, no trio).

The engine tells a `JournalTracker` which journal blocks were just written; the tracker reads their current content
through `read_jblock` (served from the engine's replica, which already has every write applied) and returns each
transaction that became complete and valid, in tid order, exactly once. It keeps no copy of the journal: only a
small index (block kind and tid per journal position, a write stamp per position) and the transactions it must hold
back because an earlier tid is still incomplete (at most `max_pending`, each smaller than the journal).

Why it is built so (docs/ARCHITECTURE.md "Two paths to the same truth"): in exact mode writes arrive as issued, so a
commit block follows the blocks it commits; in async mode chunks arrive coalesced and in any order, so a commit block
may come before its logged blocks and a twice-rewritten region may come once. Completeness is therefore judged from
content, never from arrival order:

- With CSUM_V2/V3 (ext4 with metadata_csum) every logged block carries a checksum in its tag, descriptor and revoke
  blocks a tail checksum and the commit block its own; a transaction is emitted only when all of them match the
  current content (the kernel's recovery checks the same ones).
- Without them (ext3, ext4 without metadata_csum; COMPAT_CHECKSUM v1 is treated the same) content cannot be checked,
  so the rule is conservative: every descriptor, revoke and commit block must have been reported written, and every
  logged block must have been reported written in the same `on_write` call as its descriptor first appeared or
  later. A block written before its descriptor (possible in async mode, or when the block layer reorders in-flight
  writes) keeps the transaction waiting; it ends as a `JournalGap` and the engine reconciles from home locations.

Where a transaction starts, in order of trust: right after the previous transaction's commit block (`position`),
a hint from a journal-superblock write (the kernel writes s_sequence/s_start when the log becomes non-empty, and
s_sequence/s_head when it is cleaned), right after a commit block of tid-1 seen in the journal, and only when none of
those exists, discovery: a written descriptor or revoke block of that tid whose predecessor is an older commit
block, sits at s_first, or was never reported written (the previous commit has not arrived); of several, the one
whose walk covers the most blocks. A data block can never be mistaken for a journal block, because jbd2 escapes
logged blocks that begin with the magic number. A transaction found by discovery and held is re-checked when its
turn comes: if it does not start right after the previous commit, it is looked for again from there.

Tids the kernel allocated but never wrote are skipped silently (a clean journal's s_sequence is never used; 6.18
also skips one tid at unmount): when a later tid starts exactly where the missing one would, or a superblock hint
puts the log tail/head there, and no block of the missing tids was ever seen. A tid that cannot be completed (a later
lap overwrote its start, the superblock's log tail moved past it, or more than `max_pending` later transactions are
waiting) becomes a `JournalGap` and the tracker continues after it.

Transaction sizes: a transaction is at least a commit block (6.18 writes empty ones); a descriptor holds up to
(block size - 12 - tail) / tag size tags, so loops are bounded by the block size and walks by the log length.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import crc32c

from inference.errors import CorruptMetadata
from inference.ext import jbd2_layout as L

_MASK = 0xFFFFFFFF
_ZERO4 = bytes(4)
_MAGIC_BYTES = struct.pack(">I", L.JBD2_MAGIC)
_MAX_HINTS = 8


def jbd2_crc(seed: int, *parts: bytes) -> int:
    """crc32c as the kernel's jbd2_chksum: raw CRC from `seed`, no final inversion (the crc32c package inverts)."""
    v = seed ^ _MASK
    for p in parts:
        v = crc32c.crc32c(p, v)
    return v ^ _MASK


def _tid_add(tid: int, n: int) -> int:
    return (tid + n) & _MASK


def _tid_gt(a: int, b: int) -> bool:
    """a is later than b, modulo 2**32 (the kernel's tid_gt)."""
    return 0 < ((a - b) & _MASK) < 0x80000000


@dataclass(frozen=True)
class JournalSuperblock:
    block_size: int
    maxlen: int
    first: int
    sequence: int
    start: int
    features: int  # s_feature_incompat
    uuid: bytes
    csum_v2: bool
    csum_v3: bool
    is_64bit: bool
    tag_size: int
    csum_seed: int  # jbd2_chksum(~0, uuid), as the kernel's j_csum_seed
    compat: int = 0
    version: int = 2
    checksum_type: int = 0
    num_fc_blocks: int = 0
    head: int = 0  # s_head (kernel >= 6.4): where the next transaction starts while the journal is clean

    @property
    def csum(self) -> bool:
        return self.csum_v2 or self.csum_v3

    @property
    def last(self) -> int:
        """One past the last block of the circular log (the fast-commit area, if any, is outside it)."""
        return self.maxlen - self.num_fc_blocks

    @property
    def next_start(self) -> int:
        """Where the kernel's next transaction begins: s_start if in use, else s_head if valid, else s_first."""
        if self.start:
            return self.start
        return self.head if self.first <= self.head < self.last else self.first


def parse_journal_superblock(raw: bytes) -> JournalSuperblock:
    """Parse journal block 0. Raises CorruptMetadata when it cannot describe a usable journal."""
    if len(raw) < L.SUPERBLOCK_ST.size:
        raise CorruptMetadata(f"journal superblock: {len(raw)} bytes, need {L.SUPERBLOCK_ST.size}")
    (magic, btype, _seq, bsize, maxlen, first, sequence, start, _errno, compat, incompat, _ro, uuid, _nr_users,
     _dyn, _maxt, _maxd, csum_type, _pad2, num_fc, head, _pad, checksum, _users) = L.SUPERBLOCK_ST.unpack_from(raw)
    if magic != L.JBD2_MAGIC or btype not in (L.SUPERBLOCK_V1, L.SUPERBLOCK_V2):
        raise CorruptMetadata(f"journal superblock: magic {magic:#x} type {btype}")
    if btype == L.SUPERBLOCK_V1:
        compat = incompat = csum_type = num_fc = head = 0
    if bsize < 1024 or bsize > 65536 or bsize & (bsize - 1):
        raise CorruptMetadata(f"journal superblock: block size {bsize}")
    if incompat & L.INCOMPAT_FAST_COMMIT:
        num_fc = num_fc or L.DEFAULT_FAST_COMMIT_BLOCKS
    else:
        num_fc = 0
    if not 1 <= first < maxlen - num_fc - 1:
        raise CorruptMetadata(f"journal superblock: first {first}, maxlen {maxlen}, fast-commit blocks {num_fc}")
    if start and not first <= start < maxlen - num_fc:
        raise CorruptMetadata(f"journal superblock: start {start} outside [{first}, {maxlen - num_fc})")
    v2, v3 = bool(incompat & L.INCOMPAT_CSUM_V2), bool(incompat & L.INCOMPAT_CSUM_V3)
    if v2 and v3:
        raise CorruptMetadata("journal superblock: both CSUM_V2 and CSUM_V3")
    if v2 or v3:
        if csum_type != L.CRC32C_CHKSUM:
            raise CorruptMetadata(f"journal superblock: checksum type {csum_type}")
        mine = jbd2_crc(_MASK, raw[:L.SB_CHECKSUM_OFFSET], _ZERO4, raw[L.SB_CHECKSUM_OFFSET + 4:L.SUPERBLOCK_ST.size])
        if mine != checksum:
            raise CorruptMetadata(f"journal superblock: checksum {checksum:#x}, computed {mine:#x}")
    return JournalSuperblock(
        block_size=bsize, maxlen=maxlen, first=first, sequence=sequence, start=start, features=incompat,
        uuid=bytes(uuid), csum_v2=v2, csum_v3=v3, is_64bit=bool(incompat & L.INCOMPAT_64BIT),
        tag_size=L.tag_bytes(incompat), csum_seed=jbd2_crc(_MASK, bytes(uuid)), compat=compat,
        version=2 if btype == L.SUPERBLOCK_V2 else 1, checksum_type=csum_type, num_fc_blocks=num_fc, head=head)


@dataclass
class Transaction:
    """One committed jbd2 transaction. start/end are journal positions of its first block and its commit block."""

    tid: int
    blocks: dict[int, bytes]  # fs block -> content, unescaped; later tags in the transaction win
    revoked: set[int]  # fs blocks revoked by this transaction (replay: not replayed from tids <= this one)
    commit_time_ns: int
    start: int
    end: int


@dataclass(frozen=True)
class JournalGap:
    """Transactions tid .. tid+count-1 could not be read from the journal: reconcile from home locations."""

    tid: int
    count: int = 1


@dataclass
class _Walk:
    """A transaction's journal blocks, followed from a start to a commit block (not yet checked for content)."""

    start: int
    end: int
    span: int  # journal blocks from start to end, inclusive
    tags: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # (jpos, fs block, flags, csum, desc)
    revoked: set[int] = field(default_factory=set)
    commit_time_ns: int = 0


class JournalTracker:
    """Turns journal-block writes into complete transactions, in tid order, each once (see the module docstring).

    `next_tid` and `position` (the journal block where `next_tid` should start, None if unknown) are the state an
    engine persists to resume; everything else is rebuilt from later writes.
    """

    def __init__(self, jsb: JournalSuperblock, read_jblock: Callable[[int], bytes], *, max_pending: int = 64,
                 next_tid: int | None = None, position: int | None = None, fs_blocks: int | None = None) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.jsb = jsb
        self.read_jblock = read_jblock
        self.max_pending = max_pending
        self.fs_blocks = fs_blocks
        if next_tid is None:
            self.next_tid = jsb.sequence & _MASK
            self.position: int | None = jsb.next_start if position is None else position
        else:
            self.next_tid = next_tid & _MASK
            self.position = position
        self._batch = 0
        self._stamp: dict[int, int] = {}  # jpos -> batch of its latest reported write
        self._meta: dict[int, tuple[int, int, int]] = {}  # jpos -> (block type, tid, batch it first appeared)
        self._by_tid: dict[int, set[int]] = {}  # tid -> jpos of its descriptor/revoke/commit blocks
        self._hints: dict[int, tuple[int, bool]] = {}  # tid -> (start, tid-1 is unused), from superblock writes
        self._held: dict[int, Transaction] = {}  # complete transactions waiting for an earlier tid
        self._blocked: dict[int, frozenset[int]] = {}  # tid -> positions whose next write may complete it

    # ------------------------------------------------------------------ public

    def on_write(self, jblocks: Iterable[int]) -> list[Transaction | JournalGap]:
        """Note that these journal blocks were just written; return what became complete, in tid order."""
        self._batch += 1
        jsb = self.jsb
        written = {j for j in jblocks if 0 <= j < jsb.maxlen}
        changed: set[int] = set()
        for j in written:
            self._stamp[j] = self._batch
            if j == 0:
                self._on_superblock()
                continue
            if not jsb.first <= j < jsb.last:
                continue
            old = self._meta.pop(j, None)
            if old is not None:
                self._by_tid.get(old[1], set()).discard(j)
                changed.update((old[1], _tid_add(old[1], 1)))
            hdr = self._header(self._read(j))
            if hdr is None:
                continue
            btype, tid = hdr
            appeared = old[2] if old is not None and old[:2] == hdr else self._batch
            self._meta[j] = (btype, tid, appeared)
            self._by_tid.setdefault(tid, set()).add(j)
            changed.update((tid, _tid_add(tid, 1)))
        for tid, waiting_on in list(self._blocked.items()):
            if tid in changed or waiting_on & written:
                del self._blocked[tid]
        return self._advance()

    # ------------------------------------------------------------------ reading blocks

    def _read(self, j: int) -> bytes:
        raw = self.read_jblock(j)
        return raw if len(raw) == self.jsb.block_size else b""

    @staticmethod
    def _header(raw: bytes) -> tuple[int, int] | None:
        """(block type, tid) of a descriptor, commit or revoke block; None for anything else."""
        if len(raw) < L.HEADER_ST.size:
            return None
        magic, btype, tid = L.HEADER_ST.unpack_from(raw)
        if magic != L.JBD2_MAGIC or btype not in (L.DESCRIPTOR_BLOCK, L.COMMIT_BLOCK, L.REVOKE_BLOCK):
            return None
        return btype, tid

    def _tail_ok(self, raw: bytes) -> bool:
        jsb = self.jsb
        if not jsb.csum:
            return True
        (provided,) = struct.unpack_from(">I", raw, len(raw) - L.TAIL_SIZE)
        return jbd2_crc(jsb.csum_seed, raw[:-L.TAIL_SIZE], _ZERO4) == provided

    def _commit_ok(self, raw: bytes) -> bool:
        jsb = self.jsb
        if not jsb.csum:
            return True
        off = L.COMMIT_CHKSUM_OFFSET
        (provided,) = struct.unpack_from(">I", raw, off)
        if jbd2_crc(jsb.csum_seed, raw[:off], _ZERO4, raw[off + 4:]) == provided:
            return True
        # the kernel also accepts a commit block whose checksum covers only its header (the rest read as zeros)
        return jbd2_crc(jsb.csum_seed, raw[:off], _ZERO4, raw[off + 4:L.COMMIT_ST.size],
                        bytes(len(raw) - L.COMMIT_ST.size)) == provided

    def _tags(self, raw: bytes) -> list[tuple[int, int, int]] | None:
        """(fs block, flags, checksum) of each tag of a descriptor block; None if the block cannot be one."""
        jsb = self.jsb
        size, end, off = jsb.tag_size, len(raw) - (L.TAIL_SIZE if jsb.csum else 0), L.HEADER_ST.size
        tags = []
        while off + size <= end:
            if jsb.csum_v3:
                lo, flags, hi, csum = L.TAG3_ST.unpack_from(raw, off)
            elif jsb.is_64bit:
                lo, csum, flags, hi = L.TAG_ST.unpack_from(raw, off)
            else:
                (lo, csum, flags), hi = L.TAG_ST32.unpack_from(raw, off), 0
            flags &= 0xFFFF  # the kernel reads the low 16 bits for every tag format
            block = lo | (hi << 32 if jsb.is_64bit else 0)
            if self.fs_blocks is not None and block >= self.fs_blocks:
                return None
            tags.append((block, flags, csum))
            off += size + (0 if flags & L.FLAG_SAME_UUID else L.UUID_SIZE)
            if flags & L.FLAG_LAST_TAG:
                break
        return tags

    def _revokes(self, raw: bytes) -> set[int] | None:
        jsb = self.jsb
        (count,) = struct.unpack_from(">I", raw, L.HEADER_ST.size)
        if not L.REVOKE_ST.size <= count <= len(raw) - (L.TAIL_SIZE if jsb.csum else 0):
            return None
        fmt, size = (">Q", 8) if jsb.is_64bit else (">I", 4)
        body = L.REVOKE_ST.size
        out = {b for (b,) in struct.iter_unpack(fmt, raw[body:body + (count - body) // size * size])}
        if self.fs_blocks is not None:
            out = {b for b in out if b < self.fs_blocks}
        return out

    # ------------------------------------------------------------------ finding transactions

    def _next(self, j: int) -> int:
        return j + 1 if j + 1 < self.jsb.last else self.jsb.first

    def _prev(self, j: int) -> int:
        return j - 1 if j > self.jsb.first else self.jsb.last - 1

    def _walk(self, start: int, tid: int) -> _Walk | int:
        """Follow `tid` from `start` through its descriptor/revoke blocks to its commit block.

        Returns the walk, or the position where it stopped (not yet written, bad checksum, garbage): its next write
        may complete it. Bounded by the log length.
        """
        jsb = self.jsb
        limit = jsb.last - jsb.first
        walk = _Walk(start=start, end=start, span=0)
        pos, n = start, 0
        while n < limit:
            raw = self._read(pos)
            hdr = self._header(raw)
            if hdr is None or hdr[1] != tid:
                return pos
            if not jsb.csum and self._meta.get(pos, (0, 0, 0))[:2] != hdr:
                return pos  # without checksums, only blocks reported written count
            btype = hdr[0]
            if btype == L.COMMIT_BLOCK:
                if not self._commit_ok(raw):
                    return pos
                vals = L.COMMIT_ST.unpack_from(raw)
                walk.end, walk.span, walk.commit_time_ns = pos, n + 1, vals[-2] * 1_000_000_000 + vals[-1]
                return walk
            if not self._tail_ok(raw):
                return pos
            if btype == L.REVOKE_BLOCK:
                revoked = self._revokes(raw)
                if revoked is None:
                    return pos
                walk.revoked |= revoked
            else:
                tags = self._tags(raw)
                if tags is None or n + 1 + len(tags) >= limit:
                    return pos
                desc, data = pos, pos
                for block, flags, csum in tags:
                    data = self._next(data)
                    walk.tags.append((data, block, flags, csum, desc))
                pos, n = data, n + len(tags)
            pos, n = self._next(pos), n + 1
        return start

    def _fill(self, walk: _Walk, tid: int) -> Transaction | int:
        """Check every logged block against its tag (or its write stamp) and collect the contents."""
        jsb = self.jsb
        seq = struct.pack(">I", tid)
        blocks: dict[int, bytes] = {}
        for jpos, block, flags, csum, desc in walk.tags:
            data = self._read(jpos)
            if not data:
                return jpos
            if jsb.csum:
                mine = jbd2_crc(jsb.csum_seed, seq, data)
                if (mine if jsb.csum_v3 else mine & 0xFFFF) != csum:
                    return jpos
            elif self._stamp.get(jpos, -1) < self._meta[desc][2]:
                return jpos
            blocks[block] = _MAGIC_BYTES + data[4:] if flags & L.FLAG_ESCAPE else data
        return Transaction(tid=tid, blocks=blocks, revoked=walk.revoked, commit_time_ns=walk.commit_time_ns,
                           start=walk.start, end=walk.end)

    def _pred_ok(self, j: int, tid: int) -> bool:
        """A discovered start must not be mid-transaction: it follows an older commit block, opens the log area,
        or follows a block never reported written (the previous transaction's commit that has not arrived)."""
        p = self._prev(j)
        if j == self.jsb.first or p not in self._stamp:
            return True
        hdr = self._header(self._read(p))
        return hdr is not None and hdr[0] == L.COMMIT_BLOCK and _tid_gt(tid, hdr[1])

    def _attempt(self, tid: int) -> Transaction | None:
        """The complete transaction `tid`, or None (remembering which positions to wait for)."""
        if tid in self._blocked:
            return None
        anchored: list[int] = []
        if tid == self.next_tid and self.position is not None:
            anchored.append(self.position)
        if tid in self._hints:
            anchored.append(self._hints[tid][0])
        prev = _tid_add(tid, -1)
        anchored += [self._next(j) for j in sorted(self._by_tid.get(prev, ())) if self._meta[j][0] == L.COMMIT_BLOCK]
        waiting: set[int] = set()
        for start in dict.fromkeys(anchored):
            result = self._complete(start, tid)
            if isinstance(result, Transaction):
                return result
            waiting.add(result)
        best: tuple[int, Transaction] | None = None
        for j in sorted(self._by_tid.get(tid, ())) if not anchored else ():
            if self._meta[j][0] == L.COMMIT_BLOCK or not self._pred_ok(j, tid):
                continue
            result = self._complete(j, tid)
            if isinstance(result, int):
                waiting.add(result)
            elif best is None or self._span(result) > best[0]:
                best = (self._span(result), result)
        if best is not None:
            return best[1]
        self._blocked[tid] = frozenset(waiting)
        return None

    def _span(self, tx: Transaction) -> int:
        return (tx.end - tx.start) % (self.jsb.last - self.jsb.first)

    def _complete(self, start: int, tid: int) -> Transaction | int:
        walk = self._walk(start, tid)
        return walk if isinstance(walk, int) else self._fill(walk, tid)

    # ------------------------------------------------------------------ ordering

    def _advance(self) -> list[Transaction | JournalGap]:
        out: list[Transaction | JournalGap] = []
        for _ in range(2 * self.max_pending + len(self._by_tid) + len(self._hints) + 4):
            tid = self.next_tid
            tx = self._held.pop(tid, None)
            if tx is not None and self.position is not None and tx.start != self.position:
                tx = None  # found by discovery, but the previous commit says otherwise: look again from there
            tx = tx or self._attempt(tid)
            if tx is not None:
                out.append(tx)
                self._move(_tid_add(tid, 1), self._next(tx.end))
                continue
            verdict = self._absent(tid)
            if verdict is None:
                self._collect_later()
                if len(self._held) > self.max_pending:
                    verdict = (1, True)
            if verdict is None:
                break
            count, lost = verdict
            if lost:
                out.append(JournalGap(tid, count))
                self._move(_tid_add(tid, count), None)
            else:  # never written by the kernel: nothing was lost
                self._move(_tid_add(tid, count), self.position)
        return out

    def _move(self, tid: int, position: int | None) -> None:
        self.next_tid, self.position = tid, position
        self._blocked.pop(tid, None)
        keep = _tid_add(tid, -1)
        for t in [t for t in self._by_tid if _tid_gt(keep, t)]:
            del self._by_tid[t]
        for d in (self._held, self._blocked, self._hints):
            for t in [t for t in d if _tid_gt(tid, t)]:
                del d[t]

    def _absent(self, tid: int) -> tuple[int, bool] | None:
        """Whether to stop waiting for `tid`: None to wait; (n, lost) to move past n tids, as a gap if lost.

        The kernel allocates tids it never writes (the clean journal's s_sequence; one more at unmount, seen on
        6.18), so a tid missing where it would start is skipped silently when nothing says it was ever written.
        """
        if self.position is not None:
            hdr = self._header(self._read(self.position))
            if hdr is not None and _tid_gt(hdr[1], tid):
                # a later tid starts where this one would; unless its predecessors were seen, they never existed
                u = hdr[1]
                return (1, True) if self._evidence(tid, u) else ((u - tid) & _MASK, False)
        later = [t for t in self._hints if _tid_gt(t, tid)]
        if not later:
            return None
        u = min(later, key=lambda t: (t - tid) & _MASK)
        start, prev_unused = self._hints[u]
        if start == self.position or (u == _tid_add(tid, 1) and prev_unused):
            return (u - tid) & _MASK, False  # the log tail or head is exactly where tid would start
        hdr = self._header(self._read(start))
        if hdr is None or hdr[1] != u:
            return None  # the journal does not show tid u there yet: tid's blocks may still arrive
        # the log tail moved past tid (checkpointed) before it could be read from the journal
        return (1, True) if self._evidence(_tid_add(tid, 1), u) else ((u - tid) & _MASK, True)

    def _evidence(self, lo: int, hi: int) -> bool:
        """Whether any journal block or held transaction of a tid in [lo, hi) has been seen."""
        return any(((t - lo) & _MASK) < ((hi - lo) & _MASK) for t in (*self._by_tid, *self._held))

    def _collect_later(self) -> None:
        """Try the later tids there is evidence of, holding the complete ones until `next_tid` is settled."""
        base = self.next_tid
        window = [t for t in (*self._by_tid, *self._hints) if 0 < (t - base) & _MASK <= self.max_pending + 1]
        for t in sorted(set(window), key=lambda t: (t - base) & _MASK):
            if t not in self._held:
                tx = self._attempt(t)
                if tx is not None:
                    self._held[t] = tx

    # ------------------------------------------------------------------ superblock

    def _on_superblock(self) -> None:
        """A write to journal block 0: the kernel sets features at mount and records the log tail and head."""
        try:
            jsb = parse_journal_superblock(self._read(0))
        except CorruptMetadata:
            return
        old = self.jsb
        if (jsb.block_size, jsb.maxlen, jsb.first) != (old.block_size, old.maxlen, old.first) or jsb.last != old.last:
            return  # the geometry never changes under a mounted file system: ignore a rewrite that claims so
        self.jsb = jsb
        if (jsb.features, jsb.uuid) != (old.features, old.uuid):
            self._blocked.clear()
        if jsb.start:
            hint = (jsb.sequence, (jsb.start, False))
        else:
            hint = (_tid_add(jsb.sequence, 1), (jsb.next_start, True))
        if not _tid_gt(self.next_tid, hint[0]) and self._hints.get(hint[0]) != hint[1]:
            self._hints[hint[0]] = hint[1]
            self._blocked.pop(hint[0], None)
            self._blocked.pop(self.next_tid, None)
            while len(self._hints) > _MAX_HINTS:
                del self._hints[min(self._hints, key=lambda t: (t - self.next_tid) & _MASK)]

"""The jbd2 tracker on synthetic journals: orders, wrap, escapes, revokes, gaps, garbage, and hostile input."""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.errors import CorruptMetadata
from inference.ext import jbd2_layout as L
from inference.ext.journal import JournalGap, JournalTracker, Transaction, parse_journal_superblock

M = 0xFFFFFFFF
V3 = L.INCOMPAT_CSUM_V3 | L.INCOMPAT_64BIT | L.INCOMPAT_REVOKE
V2 = L.INCOMPAT_CSUM_V2 | L.INCOMPAT_64BIT | L.INCOMPAT_REVOKE
V2_32 = L.INCOMPAT_CSUM_V2 | L.INCOMPAT_REVOKE
PLAIN = L.INCOMPAT_REVOKE  # ext3-style: no checksums, 32-bit tags
PLAIN64 = L.INCOMPAT_REVOKE | L.INCOMPAT_64BIT
UUID = bytes(range(1, 17))


def kcrc(seed: int, data: bytes) -> int:
    """The kernel's jbd2_chksum (raw crc32c from a seed), written independently of the module under test."""
    return ~crc32c.crc32c(data, ~seed & M) & M


@dataclass
class Built:
    tx: Transaction
    positions: list[int]  # journal positions written, in the order the kernel writes them


class Journal:
    """A journal built in memory the way jbd2 writes one: revokes, then descriptors with their blocks, then commit."""

    def __init__(self, features: int = V3, *, bs: int = 1024, maxlen: int = 128, first: int = 1,
                 sequence: int = 1, start: int = 0, head: int = 0) -> None:
        self.features, self.bs, self.maxlen, self.first = features, bs, maxlen, first
        self.csum = bool(features & (L.INCOMPAT_CSUM_V2 | L.INCOMPAT_CSUM_V3))
        self.seed = kcrc(M, UUID)
        self.blocks = [bytes(bs) for _ in range(maxlen)]
        self.head = start or first
        self.set_sb(sequence, start, head)
        self.base = list(self.blocks)  # the journal before any transaction was built: the replica's base image

    def set_sb(self, sequence: int, start: int, head: int = 0, features: int | None = None) -> None:
        feats = self.features if features is None else features
        csum = bool(feats & (L.INCOMPAT_CSUM_V2 | L.INCOMPAT_CSUM_V3))
        sb = bytearray(self.bs)
        struct.pack_into(">9I", sb, 0, L.JBD2_MAGIC, L.SUPERBLOCK_V2, 0, self.bs, self.maxlen, self.first, sequence,
                         start, 0)
        struct.pack_into(">3I16s", sb, 0x24, 0, feats, 0, UUID)
        sb[0x50] = L.CRC32C_CHKSUM if csum else 0
        struct.pack_into(">I", sb, 0x58, head)
        if csum:
            struct.pack_into(">I", sb, 0xFC, kcrc(M, bytes(sb[:1024])))
        self.blocks[0] = bytes(sb)

    def tag_size(self) -> int:
        if self.features & L.INCOMPAT_CSUM_V3:
            return 16
        size = 12 + (2 if self.features & L.INCOMPAT_CSUM_V2 else 0)
        return size if self.features & L.INCOMPAT_64BIT else size - 4

    def _put(self, data: bytes) -> int:
        pos = self.head
        self.blocks[pos] = data
        self.head = pos + 1 if pos + 1 < self.maxlen else self.first
        return pos

    def _tail(self, blk: bytearray) -> None:
        if self.csum:
            struct.pack_into(">I", blk, self.bs - 4, kcrc(self.seed, bytes(blk[:-4]) + bytes(4)))

    def transaction(self, tid: int, logged: list[tuple[int, bytes]], revoked: tuple[int, ...] = (),
                    per_desc: int = 1000, sec: int = 1_700_000_000) -> Built:
        start, positions = self.head, []
        if revoked:
            rec = 8 if self.features & L.INCOMPAT_64BIT else 4
            blk = bytearray(self.bs)
            body = b"".join(struct.pack(">Q" if rec == 8 else ">I", b) for b in revoked)
            struct.pack_into(">4I", blk, 0, L.JBD2_MAGIC, L.REVOKE_BLOCK, tid, 16 + len(body))
            blk[16:16 + len(body)] = body
            self._tail(blk)
            positions.append(self._put(bytes(blk)))
        tsz = self.tag_size()
        room = self.bs - 12 - (4 if self.csum else 0)
        i = 0
        while i < len(logged):
            n = min(per_desc, 1 + (room - tsz - 16) // tsz, len(logged) - i)
            chunk = logged[i:i + n]
            desc = bytearray(self.bs)
            struct.pack_into(">3I", desc, 0, L.JBD2_MAGIC, L.DESCRIPTOR_BLOCK, tid)
            off, stored = 12, []
            for k, (block, data) in enumerate(chunk):
                flags = (L.FLAG_SAME_UUID if k else 0) | (L.FLAG_LAST_TAG if k == n - 1 else 0)
                if data[:4] == struct.pack(">I", L.JBD2_MAGIC):
                    data, flags = bytes(4) + data[4:], flags | L.FLAG_ESCAPE
                c = kcrc(self.seed, struct.pack(">I", tid) + data)
                if self.features & L.INCOMPAT_CSUM_V3:
                    struct.pack_into(">4I", desc, off, block & M, flags, block >> 32, c)
                elif self.features & L.INCOMPAT_64BIT:
                    struct.pack_into(">IHHI", desc, off, block & M, c & 0xFFFF if self.csum else 0, flags, block >> 32)
                else:
                    struct.pack_into(">IHH", desc, off, block, c & 0xFFFF if self.csum else 0, flags)
                off += tsz + (0 if k else 16)
                if not k:
                    desc[off - 16:off] = UUID
                stored.append(data)
            self._tail(desc)
            positions.append(self._put(bytes(desc)))
            positions += [self._put(d) for d in stored]
            i += n
        commit = bytearray(self.bs)
        struct.pack_into(">3I", commit, 0, L.JBD2_MAGIC, L.COMMIT_BLOCK, tid)
        struct.pack_into(">QI", commit, 48, sec, tid % 1000)
        if self.csum:
            struct.pack_into(">I", commit, 16, kcrc(self.seed, bytes(commit)))
        end = self._put(bytes(commit))
        positions.append(end)
        tx = Transaction(tid=tid, blocks=dict(logged), revoked=set(revoked), commit_time_ns=sec * 10**9 + tid % 1000,
                         start=start, end=end)
        return Built(tx, positions)

    def sb(self):
        return parse_journal_superblock(self.blocks[0])


class Replica:
    """What the engine's replica holds: only the journal blocks delivered so far, as they were when delivered."""

    def __init__(self, j: Journal, **kw) -> None:
        self.j = j
        self.blocks = list(j.base)  # the base image, before any tracked write
        self.blocks[0] = j.blocks[0]
        self.tracker = JournalTracker(parse_journal_superblock(self.blocks[0]), self.read, **kw)
        self.out: list[Transaction | JournalGap] = []

    def read(self, pos: int) -> bytes:
        return self.blocks[pos]

    def deliver(self, positions) -> list[Transaction | JournalGap]:
        positions = list(positions)
        for p in positions:
            self.blocks[p] = self.j.blocks[p]
        got = self.tracker.on_write(positions)
        self.out += got
        return got


def content(tag: int, bs: int = 1024) -> bytes:
    return bytes([tag & 0xFF]) * 8 + struct.pack(">I", tag & M) + bytes(bs - 12)


def make(j: Journal, tids: list[int], n: int = 3, **kw) -> list[Built]:
    return [j.transaction(t, [(1000 + 10 * t + k, content(t * 100 + k, j.bs)) for k in range(n)], **kw) for t in tids]


def txs(out) -> list[Transaction]:
    return [x for x in out if isinstance(x, Transaction)]


# ---------------------------------------------------------------- superblock


@pytest.mark.parametrize("features, size", [(V3, 16), (L.INCOMPAT_CSUM_V3, 16), (V2, 14), (V2_32, 10),
                                            (PLAIN64, 12), (PLAIN, 8)])
def test_superblock_tag_sizes(features, size) -> None:
    jsb = Journal(features).sb()
    assert jsb.tag_size == size
    assert jsb.csum_v3 == bool(features & L.INCOMPAT_CSUM_V3) and jsb.csum_v2 == bool(features & L.INCOMPAT_CSUM_V2)
    assert jsb.is_64bit == bool(features & L.INCOMPAT_64BIT)
    assert (jsb.block_size, jsb.maxlen, jsb.first, jsb.sequence, jsb.start, jsb.uuid) == (1024, 128, 1, 1, 0, UUID)
    assert jsb.csum_seed == kcrc(M, UUID)


def test_superblock_rejects_garbage() -> None:
    j = Journal(V3)
    bad = bytearray(j.blocks[0])
    bad[0x30] ^= 1  # uuid changed, checksum not
    for raw in (bytes(1024), bytes(bad), j.blocks[0][:500]):
        with pytest.raises(CorruptMetadata):
            parse_journal_superblock(raw)
    bad = bytearray(Journal(PLAIN).blocks[0])
    struct.pack_into(">I", bad, 0x14, 500)  # s_first beyond s_maxlen
    with pytest.raises(CorruptMetadata):
        parse_journal_superblock(bytes(bad))


# ---------------------------------------------------------------- exact mode


@pytest.mark.parametrize("features", [V3, V2, V2_32, PLAIN, PLAIN64])
def test_exact_order_emits_each_at_commit(features) -> None:
    j = Journal(features, sequence=5, start=1)  # in use: tid 5 starts at block 1
    built = make(j, [5, 6, 7])
    r = Replica(j)
    for b in built:
        for p in b.positions[:-1]:
            assert r.deliver([p]) == []
        assert r.deliver([b.positions[-1]]) == [b.tx]
    assert (r.tracker.next_tid, r.tracker.position) == (8, built[-1].tx.end + 1)


def test_clean_journal_starts_at_sequence_plus_one() -> None:
    """The kernel never uses a clean journal's s_sequence: the first transaction is s_sequence + 1, silently."""
    j = Journal(V3, sequence=9)
    built = make(j, [10, 11])
    r = Replica(j)
    r.deliver(range(1, 1 + sum(len(b.positions) for b in built)))
    assert r.out == [b.tx for b in built]


def test_escaped_block_is_restored() -> None:
    j = Journal(V3, sequence=1, start=1)
    magic = struct.pack(">I", L.JBD2_MAGIC) + b"looks like a journal block" + bytes(994)
    b = j.transaction(1, [(50, magic), (51, content(1))])
    assert j.blocks[b.positions[1]][:4] == bytes(4)  # stored escaped
    r = Replica(j)
    assert r.deliver(b.positions) == [b.tx] and b.tx.blocks[50] == magic


def test_multiple_descriptors_revokes_and_last_tag_wins() -> None:
    j = Journal(V3, sequence=3, start=1)
    logged = [(200 + k, content(k)) for k in range(7)] + [(201, content(99))]
    b = j.transaction(3, logged, revoked=(5, 6, 1 << 40), per_desc=3)
    kinds = [struct.unpack_from(">2I", j.blocks[p], 0) for p in b.positions]
    assert kinds.count((L.JBD2_MAGIC, L.DESCRIPTOR_BLOCK)) == 3 and kinds[0] == (L.JBD2_MAGIC, L.REVOKE_BLOCK)
    r = Replica(j)
    (tx,) = r.deliver(b.positions)
    assert tx == b.tx and tx.blocks[201] == content(99) and tx.revoked == {5, 6, 1 << 40}
    assert (tx.start, tx.end) == (1, b.positions[-1])


def test_full_descriptor_with_many_tags() -> None:
    j = Journal(PLAIN, sequence=3, start=1, maxlen=512)
    b = j.transaction(3, [(300 + k, content(k)) for k in range(200)])  # 8-byte tags: ~125 per 1 KiB descriptor
    r = Replica(j)
    assert r.deliver(b.positions) == [b.tx]


def test_wrap_around_maxlen() -> None:
    j = Journal(V3, maxlen=24, sequence=1, start=1)
    r = Replica(j)
    for tid in range(1, 12):  # 6 blocks each: wraps several times over the 23-block log
        (b,) = make(j, [tid], n=4)
        assert r.deliver(b.positions) == [b.tx]
    assert any(tx.end < tx.start for tx in txs(r.out))  # at least one transaction wrapped


def test_superblock_write_sets_features() -> None:
    """The kernel turns on CSUM_V3|64BIT at mount: before that the journal superblock has no features."""
    j = Journal(V3, sequence=1)
    j.set_sb(1, 0, features=0)
    r = Replica(j)
    assert not r.tracker.jsb.csum
    j.set_sb(2, 1)  # the first commit after mount writes s_sequence=2, s_start=1 and the features
    built = make(j, [2, 3])
    r.deliver([0])
    for b in built:
        r.deliver(b.positions)
    assert r.out == [b.tx for b in built] and r.tracker.jsb.csum_v3


# ---------------------------------------------------------------- async mode


def test_commit_before_data() -> None:
    j = Journal(V3, sequence=1, start=1)
    (b,) = make(j, [1], n=5)
    r = Replica(j)
    assert r.deliver([b.positions[-1]]) == []  # commit first
    assert r.deliver(b.positions[:3]) == []  # descriptor and two blocks
    assert r.deliver(b.positions[3:-1]) == [b.tx]


def test_stale_data_block_waits_for_its_rewrite() -> None:
    j = Journal(V3, sequence=1, start=1)
    (b,) = make(j, [1], n=3)
    r = Replica(j)
    r.blocks[b.positions[2]] = content(12345)  # an older lap's content, reported as written
    saved, j.blocks[b.positions[2]] = j.blocks[b.positions[2]], content(12345)
    assert r.deliver(b.positions) == []
    j.blocks[b.positions[2]] = saved
    assert r.deliver([b.positions[2]]) == [b.tx]


def test_later_transaction_held_until_earlier_completes() -> None:
    j = Journal(V3, sequence=1, start=1)
    built = make(j, [1, 2, 3])
    r = Replica(j)
    assert r.deliver(built[2].positions + built[1].positions) == []
    assert r.deliver(built[0].positions[1:]) == []
    assert r.deliver(built[0].positions[:1]) == [b.tx for b in built]


def test_duplicate_rewrites_emit_once() -> None:
    j = Journal(V3, sequence=1, start=1)
    built = make(j, [1, 2])
    r = Replica(j)
    every = [p for b in built for p in b.positions]
    r.deliver(every)
    assert r.deliver(every) == [] and r.deliver(reversed(every)) == []
    assert r.out == [b.tx for b in built]


def test_no_checksum_rule_data_before_descriptor_waits() -> None:
    """Without checksums a block counts only if written with or after its descriptor (documented, conservative)."""
    j = Journal(PLAIN, sequence=1, start=1)
    (b,) = make(j, [1], n=3)
    r = Replica(j)
    assert r.deliver(b.positions[1:3]) == []  # two data blocks before the descriptor
    assert r.deliver([b.positions[0], b.positions[3], b.positions[4]]) == []
    assert r.deliver(b.positions[1:3]) == [b.tx]  # rewritten after it: now it counts


def test_no_checksum_unreported_blocks_do_not_count() -> None:
    j = Journal(PLAIN, sequence=1, start=1)
    (b,) = make(j, [1], n=2)
    r = Replica(j)
    r.blocks = list(j.blocks)  # the content is there, but nobody said it was written
    assert r.tracker.on_write([]) == []
    assert r.deliver(b.positions) == [b.tx]


# ---------------------------------------------------------------- gaps


def test_missing_transaction_becomes_gap_after_max_pending() -> None:
    j = Journal(V3, sequence=1, start=1)
    built = make(j, [1, 2, 3, 4, 5])
    r = Replica(j, max_pending=2)
    r.deliver(built[1].positions + built[2].positions)
    assert r.out == []
    r.deliver(built[3].positions)  # three held > max_pending: give up on tid 1
    assert r.out == [JournalGap(1)] + [b.tx for b in built[1:4]]
    r.deliver(built[4].positions)
    assert r.out[-1] == built[4].tx and r.tracker.next_tid == 6


def test_overwritten_transaction_becomes_gap_at_once() -> None:
    j = Journal(V3, maxlen=20, sequence=1, start=1)
    r = Replica(j)
    built = make(j, [1, 2, 3, 4], n=3)  # 5 blocks each over a 19-block log: tid 4's commit overwrites tid 1's start
    assert built[3].tx.end == built[0].tx.start
    r.deliver([p for b in built[1:] for p in b.positions])
    assert r.out[0] == JournalGap(1)
    assert txs(r.out) == [b.tx for b in built[1:]]


def test_superblock_tail_past_missing_tid_is_a_gap() -> None:
    j = Journal(V3, sequence=1, start=1)
    built = make(j, [1, 2, 3])
    r = Replica(j)
    j.set_sb(3, built[2].tx.start)  # checkpointed: the log tail is now tid 3
    r.deliver([0] + built[2].positions)
    assert r.out == [JournalGap(1, 2), built[2].tx]


def test_unmount_and_remount_skip_the_unused_tid() -> None:
    j = Journal(V3, sequence=1, start=1)
    (b1,) = make(j, [1])
    r = Replica(j)
    r.deliver(b1.positions)
    j.set_sb(2, 0, head=j.head)  # clean unmount: s_sequence=2 is never used, the next mount starts tid 3 at s_head
    r.deliver([0])
    j.set_sb(3, j.head)  # the first commit after mount
    (b3,) = make(j, [3])
    r.deliver([0])
    r.deliver(b3.positions)
    assert r.out == [b1.tx, b3.tx]


def test_remount_restarting_at_first_without_head() -> None:
    """Kernels before s_head restart the log at s_first after a clean mount; the superblock says so."""
    j = Journal(V3, sequence=1, start=1)
    built = make(j, [1, 2])
    r = Replica(j)
    r.deliver([p for b in built for p in b.positions])
    j.set_sb(3, 0)  # clean, no s_head
    r.deliver([0])
    j.head = j.first
    j.set_sb(4, j.first)
    (b4,) = make(j, [4])
    r.deliver([0])
    r.deliver(b4.positions)
    assert r.out == [b.tx for b in built] + [b4.tx]


def test_coalesced_remount_costs_at_most_a_gap() -> None:
    """If only the last superblock write is seen, tid 3 cannot be told apart from a lost one: a gap, no more."""
    j = Journal(V3, sequence=1, start=1)
    (b1,) = make(j, [1])
    r = Replica(j)
    r.deliver(b1.positions)
    j.head = j.first
    j.set_sb(3, j.first)
    (b3,) = make(j, [3])
    r.deliver([0] + b3.positions)
    assert r.out == [b1.tx, JournalGap(2), b3.tx]


# ---------------------------------------------------------------- hostile input


def test_garbage_descriptor_is_skipped() -> None:
    j = Journal(V3, sequence=1, start=1)
    (b,) = make(j, [1])
    r = Replica(j, fs_blocks=100)  # every tag names a block >= 1000: impossible for this file system
    assert r.deliver(b.positions) == []
    j2 = Journal(V3, sequence=1, start=1)
    (b2,) = make(j2, [1])
    desc = bytearray(j2.blocks[b2.positions[0]])
    desc[100] ^= 0xFF  # tail checksum no longer matches
    j2.blocks[b2.positions[0]] = bytes(desc)
    r2 = Replica(j2)
    assert r2.deliver(b2.positions) == []


def random_block(rng: random.Random, bs: int) -> bytes:
    blk = bytearray(rng.randbytes(bs))
    if rng.random() < 0.8:
        struct.pack_into(">3I", blk, 0, L.JBD2_MAGIC, rng.choice([1, 1, 2, 5, 3, 4, 9]), rng.randrange(0, 12))
    if rng.random() < 0.3:
        blk[12:] = bytes(bs - 12)  # tags of zeros: no LAST_TAG, block 0 everywhere
    if rng.random() < 0.3:
        struct.pack_into(">I", blk, 12, rng.choice([0, 15, 16, 17, bs, bs * 2, M]))
    return bytes(blk)


@pytest.mark.parametrize("features", [V3, V2_32, PLAIN])
def test_garbage_blocks_never_raise(features) -> None:
    rng = random.Random(features)
    j = Journal(features, sequence=1, start=1, maxlen=64)
    make(j, [1, 2, 3])
    r = Replica(j, max_pending=4)
    t0 = time.monotonic()
    for _ in range(300):
        p = rng.randrange(0, 64)
        j.blocks[p] = random_block(rng, 1024) if p else j.blocks[0]
        r.deliver([p, rng.randrange(64)])
    assert time.monotonic() - t0 < 20


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), features=st.sampled_from([V3, V2, V2_32]), start_tid=st.sampled_from([1, 77, M - 1]))
def test_any_delivery_order_yields_the_built_transactions(data, features, start_tid) -> None:
    j = Journal(features, sequence=start_tid, start=1, maxlen=200)
    ntx = data.draw(st.integers(1, 6))
    built = []
    for i in range(ntx):
        tid = (start_tid + i) & M
        n = data.draw(st.integers(0, 6))
        logged = [(data.draw(st.integers(1, 5000)), content(tid * 10 + k)) for k in range(n)]
        revoked = tuple(data.draw(st.lists(st.integers(1, 5000), max_size=3)))
        if not logged and not revoked:
            logged = [(9, content(tid))]
        built.append(j.transaction(tid, logged, revoked=revoked, per_desc=data.draw(st.integers(1, 4))))
    positions = [p for b in built for p in b.positions]
    order = data.draw(st.permutations(positions))
    chunks, i = [], 0
    while i < len(order):
        k = data.draw(st.integers(1, 8))
        chunks.append(order[i:i + k])
        i += k
    r = Replica(j)
    for c in chunks:
        r.deliver(c)
    assert r.out == [b.tx for b in built]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), features=st.sampled_from([V3, V2_32, PLAIN64]))
def test_random_corruption_is_harmless(seed, features) -> None:
    rng = random.Random(seed)
    j = Journal(features, sequence=1, start=1, maxlen=48)
    built = make(j, [1, 2, 3, 4], n=rng.randrange(1, 5))
    positions = [p for b in built for p in b.positions]
    for _ in range(rng.randrange(1, 6)):
        p = rng.choice(positions)
        blk = bytearray(j.blocks[p])
        for _ in range(rng.randrange(1, 4)):
            blk[rng.randrange(len(blk))] ^= 1 << rng.randrange(8)
        j.blocks[p] = bytes(blk)
    r = Replica(j, max_pending=3)
    t0 = time.monotonic()
    for _ in range(3):
        rng.shuffle(positions)
        r.deliver(positions)
    assert time.monotonic() - t0 < 5
    tids = [x.tid for x in r.out]
    assert tids == sorted(set(tids))  # tid order, each once
    for tx in txs(r.out):
        if j.csum:  # with checksums, whatever is emitted is exactly what was built
            assert tx == built[tx.tid - 1].tx

"""Real jbd2 transactions written by the host kernel (loop device) are found, ordered and verified by the tracker."""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from images.build import artifact
from inference.ext.journal import JournalGap, JournalSuperblock, JournalTracker, Transaction, parse_journal_superblock
from tests.support import require_root, require_tools

pytestmark = pytest.mark.integration

WORKLOAD = """
set -e
mkdir -p "$MNT/jt/sub"
printf 'first version\\n' > "$MNT/jt/new.txt"
dd if=/dev/urandom of="$MNT/jt/sub/data.bin" bs=4096 count=24 status=none
sync
mv "$MNT/jt/new.txt" "$MNT/jt/renamed.txt"
for i in $(seq 1 40); do echo "$i" > "$MNT/jt/sub/f$i"; done
rm "$MNT/jt/sub/f7"
sync
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def debugfs(image: Path, request: str) -> str:
    return sh("debugfs", "-R", request, str(image))


@contextmanager
def mounted(image: Path, mnt: Path, options: str | None) -> Iterator[str]:
    """Loop-mount a copy; always unmount and detach, even when the body fails."""
    loop = sh("losetup", "-f", "--show", str(image)).strip()
    is_mounted = False
    try:
        sh("mount", *(["-o", options] if options else []), loop, str(mnt))
        is_mounted = True
        yield loop
    finally:
        if is_mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


@dataclass
class Journal:
    image: Path
    block_size: int
    phys: list[int]  # journal block -> fs block

    def read(self, j: int) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(self.phys[j] * self.block_size)
            return f.read(self.block_size)

    def superblock(self) -> JournalSuperblock:
        return parse_journal_superblock(self.read(0))


def journal_of(image: Path) -> Journal:
    """The journal's block map from `stat <8>`: `blocks <8>` would also list ext3's indirect blocks."""
    bs = int(re.search(r"Block size:\s+(\d+)", sh("dumpe2fs", "-h", str(image))).group(1))
    phys: dict[int, int] = {}
    for lo, hi, plo in re.findall(r"\((\d+)(?:-(\d+))?\):(\d+)", debugfs(image, "stat <8>")):
        for k in range(int(lo), int(hi or lo) + 1):
            phys[k] = int(plo) + k - int(lo)
    return Journal(image, bs, [phys[k] for k in range(len(phys))])


def inode_table_block(image: Path, path: str) -> int:
    return int(re.search(r"located at block (\d+)", debugfs(image, f"imap {path}")).group(1))


def run_case(tmp_path: Path, name: str, options: str | None) -> tuple[Journal, JournalSuperblock, list, dict]:
    require_root()
    require_tools("losetup", "mount", "umount", "debugfs", "dumpe2fs", "dd")
    image = tmp_path / name
    subprocess.run(["cp", "--sparse=always", str(artifact(name)), str(image)], check=True)
    journal = journal_of(image)
    before = journal.superblock()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(image, mnt, options):
        subprocess.run(["sh", "-c", WORKLOAD], env={"MNT": str(mnt), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                       check=True)
        while_mounted = journal.superblock()
    after = journal.superblock()
    fs_blocks = int(re.search(r"Block count:\s+(\d+)", sh("dumpe2fs", "-h", str(image))).group(1))
    tracker = JournalTracker(before, journal.read, fs_blocks=fs_blocks)
    out = tracker.on_write(range(before.maxlen))  # as if every journal block had just been written
    one_by_one = JournalTracker(before, journal.read, fs_blocks=fs_blocks)
    assert [x for j in range(before.maxlen) for x in one_by_one.on_write([j])] == out
    backwards = JournalTracker(before, journal.read, fs_blocks=fs_blocks)  # commit blocks before their contents
    assert [x for j in reversed(range(before.maxlen)) for x in backwards.on_write([j])] == out or not before.csum
    facts = {"before": before, "while_mounted": while_mounted, "after": after, "tracker": tracker}
    print(f"\n{name} {options or ''}: journal features {after.features:#x} tag {after.tag_size} B; "
          f"sb before seq={before.sequence} start={before.start}; mounted seq={while_mounted.sequence} "
          f"start={while_mounted.start}; after seq={after.sequence} start={after.start} head={after.head}")
    for x in out:
        if isinstance(x, Transaction):
            print(f"  tid {x.tid}: journal {x.start}..{x.end} ({(x.end - x.start) + 1} blocks), "
                  f"{len(x.blocks)} fs blocks logged, {len(x.revoked)} revoked")
    return journal, before, out, facts


def check_common(journal: Journal, before: JournalSuperblock, out: list, facts: dict) -> list[Transaction]:
    assert not [x for x in out if isinstance(x, JournalGap)], out
    txs = [x for x in out if isinstance(x, Transaction)]
    assert len(txs) >= 2
    tids = [t.tid for t in txs]
    assert tids == list(range(tids[0], tids[0] + len(tids)))
    assert tids[0] == before.sequence + 1  # the kernel never uses a clean journal's s_sequence
    after = facts["after"]
    # clean after umount; the kernel allocated one more tid that it never wrote (seen on 6.18)
    assert after.start == 0 and after.sequence in (tids[-1] + 1, tids[-1] + 2)
    assert after.head in (0, txs[-1].end + 1)  # s_head (kernel >= 6.4): right after the last commit block
    assert facts["while_mounted"].start != 0  # the log tail is on disk while the journal holds transactions
    for a, b in zip(txs, txs[1:], strict=False):
        assert b.start == a.end + 1  # back to back (no wrap in these small workloads)
    image = journal.image
    logged = set().union(*(t.blocks for t in txs))
    for path in ("/jt/renamed.txt", "/jt/sub/data.bin", "/jt/sub/f40"):
        assert inode_table_block(image, path) in logged, path
    # the logged inode-table block holds the new inode: its content in the last transaction that logged it
    # matches the home location after unmount (the kernel checkpointed it)
    itb = inode_table_block(image, "/jt/renamed.txt")
    last = [t for t in txs if itb in t.blocks][-1]
    with open(image, "rb") as f:
        f.seek(itb * journal.block_size)
        assert last.blocks[itb] == f.read(journal.block_size)
    return txs


def test_ext4_real_transactions(tmp_path: Path) -> None:
    journal, before, out, facts = run_case(tmp_path, "ext4.img", None)
    after = facts["after"]
    assert after.csum_v3 and after.is_64bit and after.tag_size == 16
    txs = check_common(journal, before, out, facts)
    data = {int(b) for b in debugfs(journal.image, "blocks /jt/sub/data.bin").split()}
    assert not data & set().union(*(t.blocks for t in txs))  # data=ordered: file data is not journaled

    # checksums are really checked: one flipped byte in a logged block withholds that transaction and the rest
    victim = txs[1]
    pos = victim.start + 2  # a data block after the first descriptor (and any revoke block)

    def corrupt(j: int) -> bytes:
        raw = journal.read(j)
        return raw[:100] + bytes([raw[100] ^ 1]) + raw[101:] if j == pos else raw

    tracker = JournalTracker(before, corrupt)
    got = [x for x in tracker.on_write(range(before.maxlen)) if isinstance(x, Transaction)]
    assert [t.tid for t in got] == [t.tid for t in txs[:1]]


def test_ext3_real_transactions_without_checksums(tmp_path: Path) -> None:
    journal, before, out, facts = run_case(tmp_path, "ext3.img", None)
    after = facts["after"]
    assert not after.csum and not after.is_64bit and after.tag_size == 8
    check_common(journal, before, out, facts)


def test_ext4_data_journal_logs_file_data(tmp_path: Path) -> None:
    journal, before, out, facts = run_case(tmp_path, "ext4.img", "data=journal")
    txs = check_common(journal, before, out, facts)
    data = [int(b) for b in debugfs(journal.image, "blocks /jt/sub/data.bin").split()]
    logged = set().union(*(t.blocks for t in txs))
    assert len(data) == 24 and set(data) <= logged
    with open(journal.image, "rb") as f:
        f.seek(data[0] * journal.block_size)
        home = f.read(journal.block_size)
    assert [t for t in txs if data[0] in t.blocks][-1].blocks[data[0]] == home
    assert struct.unpack_from(">I", home)[0] is not None

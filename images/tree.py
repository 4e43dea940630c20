"""A deterministic file tree that exercises the ext parsers' corner cases (mke2fs -d copies it in).

Same seed, same names, contents, modes, xattrs and mtimes (ctimes and inode numbers are the host's).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

MTIME = 1_700_000_000  # fixed times so the tree does not depend on when it was built
BIG_DIR_ENTRIES = 5000
BIG_DIR = "many"
DEEP_PATH = "deep/d1/d2/d3/d4/d5/d6/d7"
LONG_NAME = "L" * 251 + ".txt"  # 255 bytes, the ext limit
LONG_UTF8_NAME = "é" * 127 + "x"  # 255 bytes of UTF-8 in 128 characters
ODD_NAMES = ["with space", "tab\there", "new\nline", "ünïcødé ✓ 文件.txt", "-dash", ".hidden", "*?[glob]"]


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def make_tree(root: Path, seed: int = 0) -> None:
    """Populate `root` (created if missing): deep dirs, small/large/sparse files, symlinks, hard links,
    user.* xattrs, long and odd names, and a directory with 5,000 entries."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "README").write_text(f"mirrorfs test tree, seed {seed}\n")

    deep = root / DEEP_PATH
    deep.mkdir(parents=True)
    for depth, d in enumerate([deep, *deep.parents][: DEEP_PATH.count("/") + 1]):
        _write(d / f"level{DEEP_PATH.count('/') - depth}.txt", f"depth file {depth}\n".encode() * (depth + 1))

    small = root / "small"
    small.mkdir()
    for i in range(40):
        size = rng.choice([0, 1, 60, 511, 1023, 1024, 1025, 4095, 4096, 4097, 12288, 65537])
        _write(small / f"file{i:02d}.bin", rng.randbytes(size), rng.choice([0o644, 0o600, 0o755, 0o444]))
    (small / "empty-dir").mkdir()

    large = root / "large"
    large.mkdir()
    _write(large / "random-3MiB.bin", rng.randbytes(3 << 20))
    lines = b"".join(f"line {i:07d}\n".encode() for i in range((1 << 20) // 13 + 1))
    _write(large / "pattern-1MiB.txt", lines[: 1 << 20])

    sparse = root / "sparse"
    sparse.mkdir()
    with open(sparse / "holes.bin", "wb") as f:  # data, hole, data, hole to the end
        f.write(rng.randbytes(4096))
        f.seek(4 << 20)
        f.write(rng.randbytes(8192))
        f.truncate(16 << 20)
    with open(sparse / "all-hole.bin", "wb") as f:
        f.truncate(8 << 20)

    links = root / "links"
    links.mkdir()
    (links / "relative").symlink_to("../small/file00.bin")
    (links / "absolute").symlink_to("/etc/hostname")
    (links / "dangling").symlink_to("does/not/exist")
    (links / "to-dir").symlink_to("../" + DEEP_PATH)
    (links / "long-target").symlink_to("../" + "/".join(["x" * 40] * 5))  # > 60 bytes: not a fast symlink
    _write(links / "original.txt", b"hard linked content\n")
    os.link(links / "original.txt", links / "hardlink.txt")
    os.link(links / "original.txt", root / "deep" / "hardlink-elsewhere.txt")
    os.mkfifo(links / "fifo")

    xattrs = root / "xattrs"
    xattrs.mkdir()
    _write(xattrs / "tagged.txt", b"file with extended attributes\n")
    os.setxattr(xattrs / "tagged.txt", "user.mirrorfs.small", b"value")
    os.setxattr(xattrs / "tagged.txt", "user.mirrorfs.binary", bytes(range(256)))
    os.setxattr(xattrs, "user.mirrorfs.dir", b"on a directory")

    names = root / "names"
    names.mkdir()
    for name in [LONG_NAME, LONG_UTF8_NAME, *ODD_NAMES]:
        _write(names / name, f"{name!r}\n".encode())
    (names / ("D" * 255)).mkdir()

    big = root / BIG_DIR
    big.mkdir()
    for i in range(BIG_DIR_ENTRIES):
        (big / f"entry-{i:05d}").write_bytes(b"" if i % 10 else f"{i}\n".encode())

    _fix_times(root)


def make_small_tree(root: Path, label: str) -> None:
    """A few files naming the partition they live on, so tests can tell partitions apart."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "PARTITION").write_text(label + "\n")
    (root / "dir").mkdir()
    (root / "dir" / "file.txt").write_text(f"file on {label}\n")
    (root / "dir" / "link").symlink_to("file.txt")
    _fix_times(root)


def _fix_times(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    os.utime(root, (MTIME, MTIME))

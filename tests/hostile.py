"""Hostile directory entries, made the way a guest could make them: debugfs, then raw edits of the dirent bytes.

An ext4 without a journal and without metadata_csum (`make_image`) lets a test edit directory entries in place
(docs/ARCHITECTURE.md "Hostile metadata without checksums"). `hostile_name_changes` works on a scratch image copy and
returns the block writes that turn it into one holding the hostile entries of BAD_NAMES (names a guest kernel
accepts on disk but no path component may be: `../PWNED`, `SLASH/XX`, a NUL, extra `.`/`..`, an empty name), the
legal-but-odd names of ODD_NAMES (control characters, an escape sequence, a non-UTF-8 byte, `...`) and one honest
file (HONEST_PATH). Write the changes into a copy of the image for a base that already holds them, or log them as
guest writes (tap.writelog.Record, or into a live export) for names that arrive live.

The API (`hostile_name_changes`, `make_image`, `apply_changes`, `debugfs_changes` and the constants) is used by
other tests: keep it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

# Each bad or odd name is made by debugfs under a placeholder of the same length, then the name bytes are patched.
# (directory, placeholder, final name bytes). Directories: "" is the root, "d" is /d.
_BAD: list[tuple[str, str, bytes]] = [
    ("", "XXXPWNED", b"../PWNED"),     # the escape: would walk out of the mount
    ("d", "SLASHZXX", b"SLASH/XX"),    # would alias /d/SLASH/XX, a directory that does not exist
    ("", "NULZNAME", b"NUL\0NAME"),    # a NUL ends the name for every C API
    ("", "Q", b"."),                   # an extra '.' (the real one is the first entry)
    ("", "QQ", b".."),                 # an extra '..' pointing at a directory of its own (with a file in it)
    ("d", "E", b""),                   # name_len 0: the guest kernel reads the block, lookups never match it
]
_ODD: list[tuple[str, str, bytes]] = [
    ("", "ctlXname", b"ctl\nname"),
    ("", "ESC31red", b"\x1b[31mred"),
    ("d", "nonutf8X", b"nonutf8\xff"),
    ("", "QQQ", b"..."),
]

BAD_NAMES: tuple[tuple[str, bytes], ...] = tuple((f"/{d}" if d else "/", name) for d, _, name in _BAD)
"""(directory path, raw name) of every entry that must never become a path component."""
ODD_NAMES: tuple[tuple[str, bytes], ...] = tuple((f"/{d}" if d else "/", name) for d, _, name in _ODD)
"""(directory path, raw name) of legal names with control characters, escapes, non-UTF-8 bytes: they stay."""
ODD_PATHS: tuple[bytes, ...] = tuple((b"/" + d.encode() + b"/" if d else b"/") + name for d, _, name in _ODD)
HONEST_PATH = "/honest.txt"
HONEST_CONTENT = b"an honest file written in the same step\n"
HIDDEN_CHILD = "inside.txt"  # in the directory reachable only through the extra '..' entry: must never appear
DIR_PATH = "/d"
BAD_COMPONENTS: frozenset[bytes] = frozenset({b"", b".", b".."})


def make_image(path: Path, size_mb: int = 32) -> Path:
    """A journal-less ext4 without metadata_csum (so dirents can be edited in place) holding /d and /d/keep.txt."""
    src = path.with_name(path.name + ".src")
    shutil.rmtree(src, ignore_errors=True)
    (src / "d").mkdir(parents=True)
    (src / "d" / "keep.txt").write_bytes(b"kept\n")
    (src / "top.txt").write_bytes(b"top\n")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal,^metadata_csum", "-b", "4096",
                    "-d", str(src), str(path), f"{size_mb}M"], check=True, capture_output=True)
    shutil.rmtree(src)
    return path


def apply_changes(image: Path, changes: list[tuple[int, bytes]]) -> None:
    """Write block changes into an image file in place."""
    with open(image, "r+b") as f:
        for off, data in changes:
            f.seek(off)
            f.write(data)


def hostile_name_changes(image: Path, workdir: Path, *, offset: int = 0) -> list[tuple[int, bytes]]:
    """The (disk offset, bytes) writes that add the hostile entries, the odd names and the honest file to `image`.

    `image` is left untouched (the work happens on a copy in `workdir`); it must hold a journal-less ext4
    without metadata_csum at byte `offset` (see `make_image`), with a directory /d (made if missing). Changes
    are whole 4 KiB blocks, in disk order."""
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "hostile-scratch.img"
    shutil.copyfile(image, scratch)
    fs = scratch
    if offset:
        fs = workdir / "hostile-fs.img"   # debugfs wants the file system at byte 0: work on a slice
        with open(scratch, "rb") as f:
            f.seek(offset)
            fs.write_bytes(f.read())
    payload = workdir / "hostile-payload"
    payload.write_bytes(HONEST_CONTENT)
    cmds = ["mkdir d", f"write {payload} {HONEST_PATH.lstrip('/')}"]
    for d, placeholder, final in _BAD + _ODD:
        where = f"/{d}" if d else "/"
        cmds += [f"cd {where}"]
        cmds += [f"mkdir {placeholder}", f"cd {placeholder}", f"write {payload} {HIDDEN_CHILD}"] \
            if final == b".." else [f"write {payload} {placeholder}"]
    script = workdir / "hostile.debugfs"
    script.write_text("\n".join(cmds) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), str(fs)], check=True, capture_output=True)
    _patch_names(fs, _BAD + _ODD)
    if offset:
        with open(scratch, "r+b") as f:
            f.seek(offset)
            f.write(fs.read_bytes())
        fs.unlink()
    changes = _diff(image, scratch)
    scratch.unlink()
    return changes


def debugfs_changes(image: Path, workdir: Path, commands: list[str]) -> list[tuple[int, bytes]]:
    """The block writes a list of debugfs commands makes to a copy of `image` (file system at byte 0)."""
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "debugfs-scratch.img"
    shutil.copyfile(image, scratch)
    script = workdir / "cmds.debugfs"
    script.write_text("\n".join(commands) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), str(scratch)], check=True, capture_output=True)
    changes = _diff(image, scratch)
    scratch.unlink()
    return changes


def _patch_names(fs: Path, renames: list[tuple[str, str, bytes]]) -> None:
    """Rewrite each placeholder's name bytes (and name_len, for the empty name) in its directory's blocks."""
    from inference.ext import reader as R

    with open(fs, "r+b") as f:
        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        r = R.ExtReader(read)
        bs = r.geo.block_size
        for d in sorted({d for d, _, _ in renames}):
            inode = r.lookup(b"/" + d.encode())
            extents, _ = R.file_map(inode, r.geo, r.read_block)
            wanted = {p.encode(): final for dd, p, final in renames if dd == d}
            for e in extents:
                for blk in range(e.physical, e.physical + e.length):
                    raw = bytearray(r.read_block(blk))
                    if _patch_block(raw, wanted):
                        f.seek(blk * bs)
                        f.write(raw)
            if wanted:
                raise RuntimeError(f"placeholders not found in /{d}: {sorted(wanted)}")


def _patch_block(raw: bytearray, wanted: dict[bytes, bytes]) -> bool:
    off, changed = 0, False
    while off + 8 <= len(raw):
        ino, rec_len, name_len = struct.unpack_from("<IHB", raw, off)
        if rec_len < 12:
            break
        name = bytes(raw[off + 8:off + 8 + name_len])
        if ino and name in wanted:
            final = wanted.pop(name)
            raw[off + 6] = len(final)
            raw[off + 8:off + 8 + name_len] = final.ljust(name_len, b"\0")
            changed = True
        off += rec_len
    return changed


def _diff(old: Path, new: Path, block: int = 4096) -> list[tuple[int, bytes]]:
    out = []
    with open(old, "rb") as a, open(new, "rb") as b:
        off = 0
        while True:
            x, y = a.read(block), b.read(block)
            if not y:
                break
            if x != y:
                out.append((off, y))
            off += len(y)
    return out

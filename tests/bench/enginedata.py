"""Inputs of the inference-engine benchmarks, built once into .cache/bench/engine/ and reused.

- Recorded write logs (`recorded(name)`): a fresh ext4 image is copied to a disk the host kernel writes through
  qemu-storage-daemon (images.hostwriter) while `mirrorfs attach --mode exact --sync none` records; the cache
  keeps the pristine image (`base.raw`) and the state dir (`state/`). Two workloads: `untar` (tar xf of a
  generated tarball) and `meta` (create/rename/chmod/delete of empty files and dirs, tests/bench/metaops.py).
- Many-file images (`many_image(n)`): a generated tree of n files in directories of 100, copied in with
  `mke2fs -d` (no mount), the tree deleted afterwards; build times are kept in a JSON sidecar.

Each artifact carries a recipe version; a changed recipe rebuilds it. Builds go to a temp name and are renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.bench.common import HERE, MiB, log, run
from tests.support import CACHE, REPO

MKE2FS_EXT = "lazy_itable_init=0,lazy_journal_init=0,nodiscard"
WORKLOAD_BASE_SIZE = 512 * MiB
RECIPE = {"untar": "untar-v1", "untar-text": "untar-text-v1", "meta": "meta-v1"}
MANY_RECIPE = "many-v1"

UNTAR_FILES = 3000
UNTAR_DIRS = 150


def cache_root() -> Path:
    d = CACHE / "bench" / "engine"
    d.mkdir(parents=True, exist_ok=True)
    return d


INDEX_SOURCES = ("inference/engine.py", "inference/shadow.py", "inference/blockmap.py", "inference/reconcile.py",
                 "inference/ext/*.py")  # what a pickled index holds objects of (and the code that builds it)


def code_key() -> str:
    """Hash of the sources an index depends on: a pickled index is only reused by the code that wrote it."""
    h = hashlib.sha256()
    for p in sorted({f for pat in INDEX_SOURCES for f in REPO.glob(pat)}):
        h.update(p.relative_to(REPO).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def _fresh_dir(final: Path) -> Path:
    for stale in final.parent.glob(f".{final.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def mkfs(img: Path, size: int, *extra: str | Path) -> None:
    with open(img, "wb") as f:
        f.truncate(size)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", MKE2FS_EXT, *extra, img])


# ------------------------------------------------------------------ recorded workloads

def _text(rng: random.Random, size: int) -> bytes:
    """`size` bytes of text (the diff store keeps it): lines of 63 hex digits, each with its newline."""
    hexed = rng.randbytes(size // 2 + 1).hex()[:size]
    return b"".join(hexed[i:i + 63].encode() + b"\n" for i in range(0, len(hexed), 64))[:size]


def make_tarball(path: Path, seed: int = 3, text: bool = False) -> dict:
    """UNTAR_FILES files in UNTAR_DIRS directories; sizes log-uniform 200 B..256 KiB; incompressible content
    (`text`: the same sizes, as lines of hex digits)."""
    rng = random.Random(seed)
    total = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in range(UNTAR_DIRS):
            info = tarfile.TarInfo(f"src/pkg{d // 10:02d}/mod{d:03d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for i in range(UNTAR_FILES):
            d = rng.randrange(UNTAR_DIRS)
            size = int(200 * (2 ** rng.uniform(0, 10.4)))
            info = tarfile.TarInfo(f"src/pkg{d // 10:02d}/mod{d:03d}/file{i:05d}.dat")
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000 + i
            tar.addfile(info, io.BytesIO(_text(rng, size) if text else rng.randbytes(size)))
            total += size
    return {"files": UNTAR_FILES, "dirs": UNTAR_DIRS + UNTAR_DIRS // 10 + 1, "bytes": total}


def _script(name: str, work: Path) -> tuple[str, dict]:
    if name in ("untar", "untar-text"):
        tarball = work / "src.tar"
        desc = make_tarball(tarball, text=name == "untar-text")
        return f'tar xf {tarball} -C "$MNT" && sync', desc
    return f'{sys.executable} {HERE / "metaops.py"} "$MNT/m" {work / "meta.json"} && sync', {}


def recorded(name: str) -> Path:
    """The cached recording of workload `name`: DIR/base.raw, DIR/state/, DIR/info.json."""
    final = cache_root() / name
    info = final / "info.json"
    if info.exists() and json.loads(info.read_text()).get("recipe") == RECIPE[name]:
        return final
    shutil.rmtree(final, ignore_errors=True)
    from images.hostwriter import HostWriter
    from tests.tapharness import Attach

    tmp = _fresh_dir(final)
    try:
        t0 = time.monotonic()
        base = tmp / "base.raw"
        mkfs(base, WORKLOAD_BASE_SIZE)
        work = Path(tempfile.mkdtemp(prefix="mfs-rec-", dir="/tmp"))  # short paths: unix sockets live here
        try:
            disk = work / "disk.raw"
            shutil.copyfile(base, disk)
            script, desc = _script(name, work)
            state = tmp / "state"
            log(f"recording the {name} workload (host kernel writer, exact mode) into {final}")
            with HostWriter(disk, work / "qsd") as hw:
                with Attach(hw.qmp, state, "--device", hw.node, "--mode", "exact", "--sync", "none",
                            log=work / "attach.log") as attach:
                    hw.mount()
                    t1 = time.monotonic()
                    proc = hw.run(script, timeout=600)
                    if proc.returncode:
                        raise RuntimeError(f"{name} workload failed:\n{proc.stdout}\n{proc.stderr}")
                    seconds = time.monotonic() - t1
                    hw.unmount()
                    attach.detach()
            if (work / "meta.json").exists():
                desc = json.loads((work / "meta.json").read_text())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for derived in ("replica.img", "replica.img.seq"):  # the replay needs only the log and the base
            (state / derived).unlink(missing_ok=True)
        (tmp / "info.json").write_text(json.dumps({"recipe": RECIPE[name], "workload": desc, "script": script,
                                                   "workload_s": seconds, "build_s": time.monotonic() - t0},
                                                  indent=1))
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------ many-file images

def make_many_tree(root: Path, n: int, *, data_every: int, per_dir: int = 100) -> int:
    """n regular files f0000000.. in dirs tTTT/dDD of per_dir files; every data_every-th has 1-3 KiB of data."""
    made = dirs = 0
    while made < n:
        d = made // per_dir
        sub = root / f"t{d // 100:03d}" / f"d{d % 100:02d}"
        sub.mkdir(parents=True)
        dirs += 1 + (d % 100 == 0)
        for k in range(made, min(made + per_dir, n)):
            p = os.path.join(sub, f"f{k:07d}")
            if data_every and k % data_every == 0:
                with open(p, "wb") as f:
                    f.write((b"%07d " % k) * (128 + k % 256))
            else:
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
        made = min(made + per_dir, n)
    return dirs


def many_image(n: int) -> tuple[Path, dict]:
    """ext4 image with n files (a quarter with data up to 100k files; all empty above), and its build info."""
    final = cache_root() / f"many-{n}.raw"
    side = final.with_suffix(".json")
    if final.exists() and side.exists():
        info = json.loads(side.read_text())
        if info.get("recipe") == MANY_RECIPE:
            return final, info
    final.unlink(missing_ok=True)
    data_every = 4 if n <= 100_000 else 0
    size = max(1 << 30, n * 2048 + (256 << 20)) if data_every else max(1 << 30, n * 1024 + (512 << 20))
    tmp = _fresh_dir(final)
    tree_dir = Path(tempfile.mkdtemp(prefix="mfs-tree-", dir="/tmp"))
    try:
        log(f"building a {n}-file ext4 image into {final} (tree, then mke2fs -d)")
        t0 = time.monotonic()
        dirs = make_many_tree(tree_dir / "root", n, data_every=data_every)
        t1 = time.monotonic()
        img = tmp / final.name
        mkfs(img, size, "-N", str(int(n * 1.05) + dirs + 64), "-d", tree_dir / "root")
        t2 = time.monotonic()
        info = {"recipe": MANY_RECIPE, "files": n, "dirs": dirs, "data_every": data_every, "size": size,
                "tree_s": t1 - t0, "mke2fs_s": t2 - t1, "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        log(f"{n} files: tree {t1 - t0:.0f} s, mke2fs -d {t2 - t1:.0f} s")
        img.rename(final)
        side.write_text(json.dumps(info, indent=1))
    finally:
        shutil.rmtree(tree_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return final, info


if __name__ == "__main__":  # build the inputs ahead of a run: python -m tests.bench.enginedata [untar meta 100000 ...]
    for arg in sys.argv[1:] or ["untar", "meta", "100000", "1000000"]:
        print(recorded(arg) if arg in RECIPE else many_image(int(arg)))

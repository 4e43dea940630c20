"""Build the test images from recipes into an ignored cache (nothing binary is committed).

Targets: the TCG guest kernel (Debian's, unpacked, never installed), a busybox initramfs whose /init runs a
workload script (and has dmlinear, our tiny device-mapper tool, and e2fsprogs' chattr/lsattr, which busybox lacks,
with the shared libraries they load), ext2/3/4 images populated with a generated tree,
MBR/GPT partitioned disks and an LVM2 disk.
Every step is idempotent and atomic: it builds under a temporary name and renames, so an interrupted build
never leaves a half artifact behind.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from images.tree import make_small_tree, make_tree

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

# Load order matters: busybox insmod does not resolve dependencies.
MODULES = ("virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk "
           "crc16 mbcache jbd2 crc32c_generic ext4").split()
OPTIONAL_MODULES = ("dm-mod", "dm-linear")
DMLINEAR_SRC = REPO / "images" / "dmlinear.c"
# Host binaries the guest needs and busybox has not (apt package e2fsprogs): copied with the libraries `ldd` lists.
HOST_BINARIES = ("/usr/bin/chattr", "/usr/bin/lsattr")

FS_IMAGES = {  # name -> mke2fs arguments; 64 MiB is a "small" fs whose default would be 1 KiB blocks
    "ext2.img": ["-t", "ext2", "-b", "4096"],
    "ext3.img": ["-t", "ext3", "-b", "4096"],
    "ext4.img": ["-t", "ext4", "-b", "4096"],
    "ext4-1k.img": ["-t", "ext4", "-b", "1024"],
}
FS_SIZE = 64 * MiB
MKE2FS_EXT = "lazy_itable_init=0,lazy_journal_init=0,nodiscard"

INIT = r"""#!/bin/sh
# mirrorfs guest /init: find the disk under test and the workload disk by virtio serial, run the workload.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do
  insmod /lib/modules/$m.ko || echo "MIRRORFS: insmod $m failed"
done
DISK= WL= i=0
while [ $i -lt 200 ]; do
  for d in /sys/block/vd*; do
    [ -r "$d/serial" ] || continue
    case "$(cat $d/serial)" in
      disk) DISK=/dev/${d##*/} ;;
      workload) WL=/dev/${d##*/} ;;
    esac
  done
  [ -n "$DISK" ] && [ -n "$WL" ] && [ -b "$DISK" ] && [ -b "$WL" ] && break
  usleep 50000; i=$((i+1))
done
[ -n "$DISK" ] || echo "MIRRORFS: no disk with serial 'disk'"
cat "$WL" > /workload.sh 2>/dev/null || echo "MIRRORFS: no workload disk"
PART=
for a in $(cat /proc/cmdline); do
  case "$a" in mirrorfs.mount=*) PART=${a#mirrorfs.mount=} ;; esac
done
MOUNTED=
if [ -n "$PART" ]; then
  mount "${DISK}${PART}" /mnt && MOUNTED=1 || echo "MIRRORFS: mount ${DISK}${PART} failed"
elif [ -n "$DISK" ]; then
  mount "$DISK" /mnt 2>/dev/null && MOUNTED=1
fi
export DISK MNT=/mnt
echo "MIRRORFS: init ready"
cd /mnt
sh /workload.sh
rc=$?
cd /
sync
[ -n "$MOUNTED" ] && grep -q " /mnt " /proc/mounts && umount /mnt
sync
echo "MIRRORFS: workload done rc=$rc"
poweroff -f
"""


def cache_dir() -> Path:
    """Where artifacts live; MIRRORFS_CACHE lets CI and the Makefile share one cache."""
    return Path(os.environ.get("MIRRORFS_CACHE", REPO / ".cache")) / "images"


def log(msg: str) -> None:
    print(f"[images] {msg}", flush=True)


def run(*cmd: str | Path, cwd: Path | None = None, input: bytes | None = None) -> str:
    """Run a command, raising with its stderr so a failed recipe says why."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, input=input, capture_output=True)
    if p.returncode:
        err = p.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {err}")
    return p.stdout.decode(errors="replace")


@contextmanager
def building(final: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only when the body succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*"):  # left by a killed build (we hold the cache lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)
    out = tmp if is_dir else tmp / final.name
    t0 = time.monotonic()
    try:
        yield out
        os.rename(out, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_blocks * 512 for f in final.rglob("*") if f.is_file() and not f.is_symlink()) \
        if is_dir else final.stat().st_blocks * 512
    log(f"built {final.name} in {time.monotonic() - t0:.1f} s ({size / MiB:.1f} MiB on disk)")


# ---------------------------------------------------------------- kernel

def kernel_package() -> str:
    """The exact linux-image package that the linux-image-amd64 metapackage depends on."""
    for attempt in range(2):
        try:
            out = run("apt-cache", "depends", "linux-image-amd64")
            deps = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Depends:" in line]
            names = [d for d in deps if d.startswith("linux-image-")]
            if names:
                return names[0]
        except RuntimeError:
            pass
        if attempt == 0:
            log("apt-cache has no linux-image-amd64; running apt-get update")
            run("apt-get", "update", "-qq")
    raise RuntimeError("cannot resolve the package linux-image-amd64 depends on")


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The uncompressed ELF kernel from a bzImage: PVH boots it ~2.5x faster than the bzImage under TCG."""
    magic = b"\xfd7zXZ\x00"
    pos = vmlinuz.find(magic)
    while pos >= 0:
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(vmlinuz[pos:])
            if out.startswith(b"\x7fELF"):
                return out
        except lzma.LZMAError:
            pass
        pos = vmlinuz.find(magic, pos + 1)
    raise RuntimeError("no xz-compressed ELF kernel found in vmlinuz")


def kernel_root() -> Path:
    """The unpacked kernel package (lib/modules/KVER with modules.dep), built if missing."""
    root = cache_dir() / "linux"
    if not (root / "KVER").exists():
        pkg = kernel_package()
        kver = pkg.removeprefix("linux-image-")
        log(f"kernel: downloading {pkg}")
        with building(root, is_dir=True) as tmp:
            run("apt-get", "download", "-q", pkg, cwd=tmp)
            deb = next(tmp.glob("*.deb"))
            run("dpkg", "-x", deb, tmp / "root")
            deb.unlink()
            if not (tmp / "root/lib/modules" / kver).is_dir():
                raise RuntimeError(f"{pkg} has no lib/modules/{kver}")
            run("depmod", "-b", tmp / "root", kver)
            (tmp / "KVER").write_text(kver + "\n")
    return root


def build_kernel() -> Path:
    out = cache_dir() / "vmlinux"
    if out.exists():
        return out
    root = kernel_root()
    kver = (root / "KVER").read_text().strip()
    with building(out) as tmp:
        tmp.write_bytes(extract_vmlinux((root / "root/boot" / f"vmlinuz-{kver}").read_bytes()))
    return out


# ---------------------------------------------------------------- initramfs

def _module_files(moddir: Path) -> dict[str, Path]:
    """Module name (dashes as underscores) -> file, over .ko, .ko.xz, .ko.zst."""
    found = {}
    for f in (moddir / "kernel").rglob("*.ko*"):
        found[f.name.split(".ko")[0].replace("-", "_")] = f
    return found


def _module_bytes(f: Path) -> bytes:
    """busybox insmod takes plain ELF modules only."""
    data = f.read_bytes()
    if f.name.endswith(".xz"):
        return lzma.decompress(data)
    if f.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(f)], capture_output=True, check=True).stdout
    return data


def initramfs_file() -> str:
    """The initramfs file name carries a digest of its recipe (this module and dmlinear.c).

    Artifacts are cached by file existence; a new name makes a changed recipe build a new initramfs beside the
    old one, which guests already booting (other test processes) keep using.
    """
    digest = hashlib.sha256()
    for src in (Path(__file__), DMLINEAR_SRC):
        digest.update(src.read_bytes())
    return f"initramfs-{digest.hexdigest()[:12]}.gz"


def compile_dmlinear(out: Path) -> None:
    """Static: the initramfs has busybox but no libc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found (apt packages gcc libc6-dev): needed to build /bin/dmlinear")
    try:
        run(gcc, "-O2", "-static", "-s", "-Wall", "-o", out, DMLINEAR_SRC)
    except RuntimeError as e:
        raise RuntimeError(f"cannot build /bin/dmlinear for the initramfs (static glibc and <linux/dm-ioctl.h> "
                           f"come with libc6-dev): {e}") from e


def copy_host_binaries(staging: Path, binaries: tuple[str, ...] = HOST_BINARIES) -> None:
    """Dynamically linked host tools into the initramfs at their own paths, with every library `ldd` resolves
    and the dynamic loader, also at their own paths (the loader finds them in its built-in multiarch dirs)."""
    for binary in binaries:
        if not Path(binary).exists():
            raise RuntimeError(f"{binary} not found (apt package e2fsprogs): the guest's chattr/lsattr")
        needed = [binary]
        for line in run("ldd", binary).splitlines():
            parts = line.split()
            path = parts[2] if len(parts) > 2 and parts[1] == "=>" else parts[0] if parts else ""
            if path.startswith("/"):
                needed.append(path)
        for f in needed:
            dest = staging / f.lstrip("/")
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(f), dest)


def build_initramfs() -> Path:
    out = artifact_path("initramfs.gz")
    if out.exists():
        return out
    root = kernel_root()
    kver = (root / "KVER").read_text().strip()
    moddir = root / "root/lib/modules" / kver
    files = _module_files(moddir)
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
               for line in (moddir / "modules.builtin").read_text().split()}
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not found (apt package busybox-static)")
    with building(out) as tmp:
        staging = tmp.parent / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "mnt", "tmp", "etc",
                  "lib/modules"):
            (staging / d).mkdir(parents=True)
        shutil.copy2(busybox, staging / "bin/busybox")
        compile_dmlinear(staging / "bin/dmlinear")
        copy_host_binaries(staging)  # before the applet links: a busybox applet of the same name never wins
        for applet in run(busybox, "--list-full").split():
            link = staging / applet
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(staging / "bin/busybox", link.parent))
        loaded = []
        for name in [*MODULES, *OPTIONAL_MODULES]:
            key = name.replace("-", "_")
            if key in files:
                (staging / "lib/modules" / f"{key}.ko").write_bytes(_module_bytes(files[key]))
                loaded.append(key)
            elif key not in builtin and name not in OPTIONAL_MODULES:
                raise RuntimeError(f"module {name} is neither a module file nor built in")
        _check_module_deps(moddir, loaded)
        (staging / "etc/modules").write_text("\n".join(loaded) + "\n")
        (staging / "init").write_text(INIT)
        (staging / "init").chmod(0o755)
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
        cpio = run_bytes(["cpio", "-o", "-H", "newc", "--quiet", "--owner=0:0"], cwd=staging,
                         input="\n".join(names).encode() + b"\n")
        tmp.write_bytes(gzip.compress(cpio, compresslevel=6, mtime=0))
    return out


def run_bytes(cmd: list[str], cwd: Path, input: bytes) -> bytes:
    return subprocess.run(cmd, cwd=cwd, input=input, capture_output=True, check=True).stdout


def _check_module_deps(moddir: Path, loaded: list[str]) -> None:
    """Fail the build if a module would be loaded before (or without) one it needs."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        key = Path(mod).name.split(".ko")[0].replace("-", "_")
        deps[key] = [Path(d).name.split(".ko")[0].replace("-", "_") for d in rest.split()]
    for i, mod in enumerate(loaded):
        missing = [d for d in deps.get(mod, []) if d not in loaded[:i]]
        if missing:
            raise RuntimeError(f"module {mod} needs {missing} loaded before it")


# ---------------------------------------------------------------- file-system images

def tree_dir() -> Path:
    """The generated tree that populates every image, built once."""
    out = cache_dir() / "tree"
    if not out.exists():
        with building(out, is_dir=True) as tmp:
            make_tree(tmp)
    return out


def mke2fs(target: Path, size: int, args: list[str], src: Path, *, offset: int = 0, label: str = "") -> None:
    """mke2fs -d populates without mounting; -E offset writes into a partition of a disk file (no loop)."""
    ext = MKE2FS_EXT + (f",offset={offset}" if offset else "")
    run("mke2fs", "-q", "-F", *args, "-E", ext, *(["-L", label] if label else []), "-d", src,
        target, f"{size // 1024}k")


def build_fsimage(name: str) -> Path:
    out = cache_dir() / name
    if out.exists():
        return out
    src = tree_dir()
    with building(out) as tmp:
        mke2fs(tmp, FS_SIZE, FS_IMAGES[name], src, label=name.removesuffix(".img"))
    return out


# ---------------------------------------------------------------- partitioned disks

PART_TABLES = {
    # name -> (disk size, sfdisk script, {partition number: what goes there})
    "mbr.img": (128 * MiB, "label: dos\n"
                           "start=2048, size=32MiB, type=83\n"
                           "size=24MiB, type=83\n"
                           "size=8MiB, type=82\n"
                           "type=5\n"
                           "size=32MiB, type=83\n",
                {1: "tree", 2: "small", 3: "swap", 5: "small"}),
    "gpt.img": (128 * MiB, "label: gpt\n"
                           "start=2048, size=48MiB, type=L, name=one\n"
                           "size=48MiB, type=L, name=two\n",
                {1: "tree", 2: "small"}),
}


def _write_swap(disk: Path, offset: int, size: int) -> None:
    """mkswap has no offset option: make the swap area in a scratch file and copy its non-zero pages in."""
    with tempfile.TemporaryDirectory(dir=disk.parent) as td:
        swap = Path(td) / "swap"
        with open(swap, "wb") as f:
            f.truncate(size)
        run("mkswap", "-q", swap)
        with open(swap, "rb") as src, open(disk, "r+b") as dst:
            for pos in range(0, size, 4096):
                page = src.read(4096)
                if page.strip(b"\0"):
                    dst.seek(offset + pos)
                    dst.write(page)


def build_parts(name: str) -> Path:
    out = cache_dir() / name
    if out.exists():
        return out
    size, script, contents = PART_TABLES[name]
    src = tree_dir()
    with building(out) as tmp:
        with open(tmp, "wb") as f:
            f.truncate(size)
        run("sfdisk", "-q", tmp, input=script.encode())
        table = json.loads(run("sfdisk", "-J", tmp))["partitiontable"]
        sector = table.get("sectorsize", 512)
        for part in table["partitions"]:
            num = int(part["node"].removeprefix(str(tmp)).lstrip("p"))
            what = contents.get(num)
            offset, psize = part["start"] * sector, part["size"] * sector
            label = f"{name.removesuffix('.img')}-p{num}"
            if what == "swap":
                _write_swap(tmp, offset, psize)
            elif what == "tree":
                mke2fs(tmp, psize, ["-t", "ext4"], src, offset=offset, label=label)
            elif what == "small":
                with tempfile.TemporaryDirectory(dir=tmp.parent) as td:
                    make_small_tree(Path(td), label)
                    mke2fs(tmp, psize, ["-t", "ext4"], Path(td), offset=offset, label=label)
    return out


# ---------------------------------------------------------------- LVM2 disk

LVM_VG = "vgmirror"
LVM_CONF = """devices { filter = [ "a|^/dev/loop|", "r|.*|" ] obtain_device_list_from_udev = 0 use_devicesfile = 0
  scan_lvs = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
global { event_activation = 0 }
"""


@contextmanager
def lvm_session(image: Path, offset: int = 0, size: int = 0) -> Iterator[tuple[Callable[..., str], str]]:
    """Attach `image` (or its `size` bytes at `offset`: one partition) to a loop device; yield (`lvm`, loop device).

    `lvm(cmd, *args)` runs an lvm command confined to that device.

    The host's own LVM is never touched: a private LVM_SYSTEM_DIR with a loop-only filter, no devices file, no
    backups, `--devices` naming only our loop, and `--driverloaded n` (no device-mapper: LVs are never activated,
    which also works in containers without /dev/mapper). The loop is detached even when a command fails.
    """
    with tempfile.TemporaryDirectory(prefix="mirrorfs-lvm.") as etc:
        (Path(etc) / "lvm.conf").write_text(LVM_CONF)
        env = {**os.environ, "LVM_SYSTEM_DIR": etc, "LVM_SUPPRESS_FD_WARNINGS": "1"}
        part = [*(["--offset", str(offset)] if offset else []), *(["--sizelimit", str(size)] if size else [])]
        loop = run("losetup", "-f", "--show", *part, image).strip()
        try:
            def lvm(cmd: str, *args: str) -> str:
                p = subprocess.run(["lvm", cmd, "--devices", loop, "--driverloaded", "n", *args],
                                   capture_output=True, env=env)
                if p.returncode:
                    raise RuntimeError(f"lvm {cmd} {' '.join(args)} failed: {p.stderr.decode(errors='replace')}")
                return p.stdout.decode(errors="replace")
            yield lvm, loop
            lvm("vgchange", "-an")
        finally:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def lvm_layout(lvm: Callable[..., str]) -> dict:
    """What the LVM tools say the layout is, in bytes: the ground truth the volume tests compare against."""
    pv = json.loads(lvm("pvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                        "-o", "pv_uuid,pe_start"))["report"][0]["pv"][0]
    vg = json.loads(lvm("vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
                        "-o", "vg_name,vg_extent_size,vg_seqno"))["report"][0]["vg"][0]
    segs = json.loads(lvm("lvs", "--reportformat", "json", "--segments", "-o",
                          "lv_name,lv_uuid,segtype,seg_start_pe,seg_size_pe,seg_pe_ranges"))["report"][0]["seg"]
    pe_start, extent = int(pv["pe_start"]), int(vg["vg_extent_size"])
    lvs: dict[str, dict] = {}
    for seg in segs:
        lv = lvs.setdefault(seg["lv_name"], {"uuid": seg["lv_uuid"], "size": 0, "segments": [], "pe_ranges": []})
        first = int(seg["seg_pe_ranges"].rsplit(":", 1)[1].split("-")[0])
        n = int(seg["seg_size_pe"])
        lv["segments"].append([pe_start + first * extent, int(seg["seg_start_pe"]) * extent, n * extent])
        lv["pe_ranges"].append(seg["seg_pe_ranges"])
        lv["size"] += n * extent
    return {"vg": vg["vg_name"], "seqno": int(vg["vg_seqno"]), "pv_uuid": pv["pv_uuid"], "pe_start": pe_start,
            "extent_size": extent, "lvs": lvs}


def write_lv(disk: Path, segments: list[list[int]], content: Path) -> None:
    """Copy a file-system image into an LV through its segments (what dm-linear would do), keeping holes."""
    with open(content, "rb") as src, open(disk, "r+b") as dst:
        for disk_off, lv_off, length in segments:
            for pos in range(0, length, MiB):
                src.seek(lv_off + pos)
                chunk = src.read(min(MiB, length - pos))
                if chunk.strip(b"\0"):
                    dst.seek(disk_off + pos)
                    dst.write(chunk)


def build_lvm() -> Path:
    """lvm.img: a whole-disk PV, VG vgmirror, LV one (two segments: lvextend after LV two) and LV two, each ext4.

    Beside it, lvm.json holds the layout as the LVM tools report it. Needs root (loop device).
    """
    out = cache_dir() / "lvm.img"
    if out.exists():
        return out
    with building(out) as tmp:
        with open(tmp, "wb") as f:
            f.truncate(128 * MiB)
        with lvm_session(tmp) as (lvm, loop):
            lvm("pvcreate", "-q", loop)
            lvm("vgcreate", "-q", LVM_VG, loop)
            for name, size in (("one", "16M"), ("two", "24M")):
                lvm("lvcreate", "-q", "-an", "-Zn", "-Wn", "-L", size, "-n", name, LVM_VG)
            lvm("lvextend", "-q", "-L", "+16M", f"{LVM_VG}/one")
            layout = lvm_layout(lvm)
        for name, lv in layout["lvs"].items():
            with tempfile.TemporaryDirectory(dir=tmp.parent) as td:
                make_small_tree(Path(td) / "tree", f"lvm-{name}")
                fs = Path(td) / "fs"
                mke2fs(fs, lv["size"], ["-t", "ext4"], Path(td) / "tree", label=f"lvm-{name}")
                write_lv(tmp, lv["segments"], fs)
        meta = cache_dir() / "lvm.json"
        meta.with_suffix(".json.tmp").write_text(json.dumps(layout, indent=1) + "\n")
        os.rename(meta.with_suffix(".json.tmp"), meta)
    return out


# ---------------------------------------------------------------- public API

BUILDERS: dict[str, Callable[[], Path]] = {
    "vmlinux": build_kernel,
    "initramfs.gz": build_initramfs,
    **{name: (lambda n=name: build_fsimage(n)) for name in FS_IMAGES},
    **{name: (lambda n=name: build_parts(n)) for name in PART_TABLES},
    "lvm.img": build_lvm,
}
TARGETS = {
    "kernel": ["vmlinux"],
    "initramfs": ["initramfs.gz"],
    "fsimages": list(FS_IMAGES),
    "parts": list(PART_TABLES),
    "lvm": ["lvm.img"],
}
TARGETS["all"] = [a for t in ("kernel", "initramfs", "fsimages", "parts", "lvm") for a in TARGETS[t]]


def artifact_path(name: str) -> Path:
    """Where artifact `name` lives (built or not): its name in the cache, the initramfs's with a recipe digest."""
    return cache_dir() / (initramfs_file() if name == "initramfs.gz" else name)


def artifact(name: str) -> Path:
    """Path of a built artifact ("vmlinux", "initramfs.gz", "ext4.img", "mbr.img", ...); builds it if missing.

    Callers that modify an image must work on a copy.
    """
    if name not in BUILDERS:
        raise KeyError(f"unknown artifact {name!r}; known: {', '.join(BUILDERS)}")
    path = artifact_path(name)
    if path.exists():
        return path
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as lock:  # one builder at a time across processes (xdist, CI, make)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return path if path.exists() else BUILDERS[name]()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m images.build",
        description="Build mirrorfs test artifacts into $MIRRORFS_CACHE/images (default .cache/images). "
                    "Already built artifacts are skipped; delete one to rebuild it (the initramfs file is named by "
                    "a digest of its recipe, so a changed recipe builds a new one).",
        epilog="targets: kernel = vmlinux (Debian linux-image, unpacked, never installed); "
               "initramfs = busybox + dmlinear + virtio/ext4/dm modules + /init that runs a workload disk; "
               "fsimages = ext2/ext3/ext4/ext4-1k images (64 MiB) of a generated tree; "
               "parts = mbr.img and gpt.img partitioned disks; lvm = lvm.img (LVM2 PV, two ext4 LVs, "
               "needs root); all = everything.")
    ap.add_argument("targets", nargs="+", choices=sorted(TARGETS), help="what to build")
    args = ap.parse_args(argv)
    for target in args.targets:
        for name in TARGETS[target]:
            path = artifact_path(name)
            if path.exists():
                log(f"{path.name}: up to date ({path.stat().st_size / MiB:.1f} MiB)")
            else:
                artifact(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

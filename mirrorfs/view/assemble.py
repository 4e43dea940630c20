"""How the view lays out several file systems of one disk: directory names, and `--assemble` from /etc/fstab.

Pure functions over `inference.view.Identity` records, so they are tested without FUSE or an engine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from inference.view import Identity

# guest device names that say which partition: /dev/vda1, /dev/sdb5, /dev/hda2, /dev/xvda1, /dev/nvme0n1p3,
# /dev/mmcblk0p1 (one disk per guest as far as we know: the partition number decides)
_PART_DEV = re.compile(r"/dev/(?:(?:[shv]|xv)d[a-z]+(\d+)|(?:nvme\d+n\d+|mmcblk\d+)p(\d+))")
_BY = {"/dev/disk/by-label/": "LABEL", "/dev/disk/by-uuid/": "UUID", "/dev/disk/by-partuuid/": "PARTUUID",
       "/dev/disk/by-partlabel/": "PARTLABEL"}
SKIP_TYPES = {"swap", "proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "nfs", "nfs4",
              "cifs", "none", "ignore"}


@dataclass(frozen=True, slots=True)
class FstabEntry:
    spec: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_fstab(text: str) -> list[FstabEntry]:
    """The entries of an fstab(5) text (comments, blank and short lines skipped; octal escapes decoded)."""
    out = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        fstype = fields[2] if len(fields) > 2 else "auto"
        options = tuple(fields[3].split(",")) if len(fields) > 3 else ("defaults",)
        out.append(FstabEntry(_unescape(fields[0]), _unescape(fields[1]), fstype, options))
    return out


def match(spec: str, identities: Iterable[Identity]) -> str | None:
    """The file system an fstab spec names (LABEL=, UUID=, PARTUUID=, PARTLABEL=, /dev/disk/by-*/, /dev/vdXN,
    /dev/sdXN, /dev/nvme0n1pN, /dev/mapper/VG-LV, /dev/VG/LV), or None."""
    ids = list(identities)
    for prefix, key in _BY.items():
        if spec.startswith(prefix):
            spec = f"{key}={spec[len(prefix):]}"
    key, eq, value = spec.partition("=")
    if eq and key in ("LABEL", "UUID", "PARTUUID", "PARTLABEL"):
        value = value.strip('"')
        for i in ids:
            have = {"LABEL": i.label, "UUID": i.uuid, "PARTUUID": i.partuuid, "PARTLABEL": i.partlabel}[key]
            if have and (have == value if key in ("LABEL", "PARTLABEL") else have.lower() == value.lower()):
                return i.name
        return None
    m = _PART_DEV.fullmatch(spec)
    if m:
        name = f"p{int(m.group(1) or m.group(2))}"
        return name if any(i.name == name for i in ids) else None
    if spec.startswith("/dev/mapper/") or spec.count("/") == 3 and spec.startswith("/dev/"):
        lv = spec.rsplit("/", 1)[1]
        if spec.startswith("/dev/mapper/"):   # VG-LV, a dash in a name doubled
            parts = re.split(r"(?<!-)-(?!-)", lv)
            lv = parts[-1].replace("--", "-") if len(parts) > 1 else lv
        return lv if any(i.name == lv for i in ids) else None
    return None


def plan(fstab: list[FstabEntry], identities: Iterable[Identity], root: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(file system, mount point) pairs to lay over the root file system, parents before children, and notes on
    the entries left out. The root file system (the one holding the fstab) is never mounted again."""
    ids = list(identities)
    mounts: dict[str, str] = {}
    notes: list[str] = []
    for e in fstab:
        if e.fstype in SKIP_TYPES or not e.mountpoint.startswith("/"):
            continue
        fs = match(e.spec, ids)
        point = "/" + "/".join(p for p in e.mountpoint.split("/") if p)
        if fs is None:
            notes.append(f"{e.spec} on {e.mountpoint}: no file system of this disk matches")
        elif "noauto" in e.options:
            notes.append(f"{e.spec} on {e.mountpoint}: noauto, not mounted")
        elif point == "/" or fs == root:
            if fs != root:
                notes.append(f"{e.spec} is the guest's / but {root} holds /etc/fstab: {root} stays the root")
        elif point in mounts.values():
            prev = next(f for f, p in mounts.items() if p == point)
            notes.append(f"{point}: {fs} is mounted over {prev}")
            del mounts[prev]
            mounts[fs] = point
        elif fs in mounts:
            notes.append(f"{fs} is listed twice; mounted on {mounts[fs]} only")
        else:
            mounts[fs] = point
    order = sorted(mounts.items(), key=lambda kv: (kv[1].count("/"), kv[1]))
    return order, notes


def dir_names(identities: Iterable[Identity]) -> dict[str, bytes]:
    """One directory per file system: its label if no other has it, else its UUID if unique, else its engine
    name (pN, disk or the LV name). Names that cannot be a path component fall back the same way."""
    ids = list(identities)

    def ok(name: str) -> bool:
        return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")

    labels = [i.label for i in ids]
    uuids = [i.uuid for i in ids]
    out: dict[str, bytes] = {}
    for i in ids:
        if ok(i.label) and labels.count(i.label) == 1:
            name = i.label
        elif ok(i.uuid) and uuids.count(i.uuid) == 1:
            name = i.uuid
        else:
            name = i.name.replace("/", "_")
        out[i.name] = name.encode("utf-8", "surrogateescape")
    taken = [n for n in out.values()]
    for fs, name in list(out.items()):  # a label equal to another's engine name (a label "p2"): engine name wins
        if taken.count(name) > 1 and name != fs.encode():
            out[fs] = fs.replace("/", "_").encode()
    return out

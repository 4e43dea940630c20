"""Directory names for several file systems, and the /etc/fstab parsing and matching behind --assemble."""

from __future__ import annotations

from inference.view import Identity
from mirrorfs.view.assemble import dir_names, match, parse_fstab, plan

P1 = Identity("p1", "rootfs", "8f260035-69e3-423a-9804-822a31095420", "7b73309f-01", "")
P2 = Identity("p2", "mbr-p2", "d338ad32-e28a-411f-a000-135c45d2fc41", "7b73309f-02", "")
P5 = Identity("p5", "", "a6a15a14-6a84-4165-8e32-292fbcebc847", "7b73309f-05", "")
IDS = [P1, P2, P5]

FSTAB = r"""
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
UUID=8F260035-69E3-423A-9804-822A31095420 /  ext4  errors=remount-ro 0 1
LABEL=mbr-p2    /data   ext4    defaults        0       2
/dev/vda5       /data/srv ext4  defaults        0       2
/dev/vda3       none    swap    sw      0       0
proc            /proc   proc    defaults        0       0
LABEL=missing   /mnt    ext4    defaults        0       2
PARTUUID=7b73309f-02 /backup ext4 noauto 0 0
"""


def test_parse_fstab():
    entries = parse_fstab(FSTAB + "/dev/vdb1 /with\\040space ext4\n")
    assert entries[0].spec.startswith("UUID=") and entries[0].mountpoint == "/"
    assert entries[-1].mountpoint == "/with space" and entries[-1].options == ("defaults",)
    assert len(entries) == 8


def test_match_every_spelling():
    assert match("LABEL=mbr-p2", IDS) == "p2" and match('LABEL="mbr-p2"', IDS) == "p2"
    assert match("UUID=A6A15A14-6A84-4165-8E32-292FBCEBC847", IDS) == "p5"
    assert match("PARTUUID=7b73309f-05", IDS) == "p5" and match("/dev/disk/by-label/rootfs", IDS) == "p1"
    assert match("/dev/vda2", IDS) == match("/dev/sdb2", IDS) == match("/dev/nvme0n1p2", IDS) == "p2"
    assert match("/dev/vda4", IDS) is None and match("LABEL=x", IDS) is None
    assert match("/dev/mapper/vg0-data--lv", [Identity("data-lv", "", "", "", "")]) == "data-lv"
    assert match("/dev/vg0/data", [Identity("data", "", "", "", "")]) == "data"


def test_plan_orders_parents_first_and_says_what_it_left_out():
    order, notes = plan(parse_fstab(FSTAB), IDS, "p1")
    assert order == [("p2", "/data"), ("p5", "/data/srv")]
    assert any("LABEL=missing" in n for n in notes) and any("noauto" in n for n in notes)


def test_dir_names_label_then_uuid_then_engine_name():
    assert dir_names(IDS) == {"p1": b"rootfs", "p2": b"mbr-p2", "p5": P5.uuid.encode()}
    twins = [Identity("p1", "same", "u1", "", ""), Identity("p2", "same", "u2", "", ""),
             Identity("p3", "", "", "", ""), Identity("p4", "p3", "u4", "", "")]
    assert dir_names(twins) == {"p1": b"u1", "p2": b"u2", "p3": b"p3", "p4": b"p4"}

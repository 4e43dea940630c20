"""The tap with the host kernel as the writer, through qemu-storage-daemon: same byte-for-byte promise."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.integration.test_tap_guest import WORKLOAD
from tests.support import require_root, require_tools
from tests.tapharness import Attach, log_seqs, mirrorfs, same_bytes

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("mode", "sync"), [("exact", "none"), ("async", "full")])
def test_host_kernel_writes_through_qsd_replica_equals_disk(tmp_path, mode, sync):
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "cmp")
    from images.build import artifact
    from images.hostwriter import HostWriter

    base = tmp_path / "base.raw"
    shutil.copyfile(artifact("ext4.img"), base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state = tmp_path / "state"
    with HostWriter(disk, tmp_path / "qsd") as hw:
        hw.start()
        with Attach(hw.qmp, state, "--device", hw.node, "--mode", mode, "--sync", sync) as attach:
            hw.mount()
            proc = hw.run(WORKLOAD, timeout=240)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            hw.unmount()
            attach.detach()
        hw.stop()
    assert not same_bytes(base, disk)
    out = tmp_path / "replica.raw"
    if sync == "none":
        mirrorfs("replica", "--state", state, "--base", base, "-o", out)
    else:
        mirrorfs("replica", "--state", state, "-o", out)
    assert same_bytes(out, disk)
    seqs = log_seqs(state)
    assert seqs == list(range(1, len(seqs) + 1))
    info = json.loads((state / "attach.json").read_text())
    # every write the tap answered is in its latency histogram (the metrics endpoint serves it from here)
    hist = info["write_latency"]
    assert hist["buckets"][-1] == ["+Inf", info["writes"]] and info["writes"] > 0 and hist["sum"] > 0
    counts = [n for _, n in hist["buckets"]]
    assert counts == sorted(counts)  # cumulative
    if sync == "full":  # the whole-disk copy's progress, as QEMU last reported it before the job was ready
        assert info["copy"]["total"] >= disk.stat().st_size and info["copy"]["done"] == info["copy"]["total"]
    else:
        assert info["copy"] is None

"""The inference engine live behind a real TCG guest: the workload's operations come out as mutations."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.test_tap_guest import WORKLOAD
from tests.support import require_tools
from tests.tapharness import Attach, mirrorfs

pytestmark = pytest.mark.integration

FILES = [f"/work/a/b/f{i}" for i in range(40)]


def _events(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]


def run_live(tmp_path: Path, image: str, workload: str = WORKLOAD) -> tuple[Path, Path, list[dict]]:
    from images.build import artifact
    from images.guest import DONE, Guest

    require_tools("qemu-system-x86_64")
    base = tmp_path / "base.raw"
    shutil.copyfile(artifact(image), base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state = tmp_path / "state"
    with Guest(disk, workload, tmp_path / "vm", paused=True) as guest:
        with Attach(guest.qmp, state, "--cont", "--base", str(base)) as attach:
            guest.wait_for(DONE + " rc=0", timeout=240)
            guest.wait_for("reboot: Power down", timeout=30)
            out = attach.detach()
    assert "inference engine pid" in out
    return base, state, _events(state)


@pytest.mark.parametrize("image", ["ext4.img", "ext3.img", "ext2.img"])
def test_workload_operations_become_mutations(tmp_path, image):
    base, state, events = run_live(tmp_path, image)
    assert not [e for e in events if e["kind"] == "error"], events
    by_kind = Counter(e["kind"] for e in events)
    names = {(e["kind"], e["path"]) for e in events}
    assert {("mkdir", p) for p in ("/work", "/work/a", "/work/a/b", "/work/a/b/c")} <= names
    assert {("create", p) for p in ["/work/app.log", "/work/big", *FILES]} <= names
    assert by_kind["create"] == 42 and by_kind["mkdir"] == 4
    renames = {(e["old_path"], e["path"]) for e in events if e["kind"] == "rename"}
    # both mv's landed in one transaction: either order is a valid history
    assert renames in ({("/work/a/b", "/work/renamed"), ("/work/renamed/f1", "/work/renamed/c/moved")},
                       {("/work/a/b/f1", "/work/a/b/c/moved"), ("/work/a/b", "/work/renamed")})
    # the rm of f2 and f3 landed with the mv of their directory (one transaction on ext3/4; on ext2 home blocks
    # in any order): a delete named under the directory's old path is the same history on disk (the fidelity
    # checker's rule; seen under load on ext2)
    deleted = {e["path"].replace("/work/a/b/", "/work/renamed/", 1) for e in events if e["kind"] == "delete"}
    assert deleted == {"/work/renamed/f2", "/work/renamed/f3", "/work/renamed/c/moved"}
    assert by_kind["delete"] == 3
    assert [e["path"] for e in events if e["kind"] == "rmdir"] == ["/work/renamed/c"]
    big = [e for e in events if e["path"] == "/work/big" and e["kind"] == "modify"]
    assert big and big[-1]["size"] == 64 * 65536
    assert sorted(r for e in big for r in map(tuple, e["ranges"]))[-1][1] == 64 * 65536
    log_mods = [e for e in events if e["path"] == "/work/app.log" and e["kind"] == "modify"]
    assert log_mods[-1]["size"] == sum(len(f"line {i} ") + 20 for i in range(40)) + 5 or log_mods[-1]["size"] > 800
    # no false positives: nothing outside the workload's directory changed
    assert all(e["path"].startswith("/work") for e in events)
    # the events are in seq order
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    # an offline replay of the same log gives the same events as the live engine did, times included (one
    # record-time clock: inference/runner.py)
    live = (state / "events.jsonl").read_text()
    mirrorfs("replay", "--state", state, "--base", base)
    assert (state / "events.jsonl").read_text().splitlines() == live.splitlines()


def test_replay_from_an_index_equals_replay_from_the_base(tmp_path):
    """`mirrorfs index` saves the starting shadow tree; replaying with it gives exactly the --base events."""
    base, state, events = run_live(tmp_path, "ext4.img")
    index = tmp_path / "base.mfsidx"
    out = mirrorfs("index", base, "-o", index)
    assert index.exists() and "indexed" in out.stderr
    mirrorfs("replay", "--state", state, "--index", index)
    again = _events(state)
    strip = lambda evs: [{k: v for k, v in e.items() if k != "time"} for e in evs]  # noqa: E731
    assert strip(again) == strip(events)
    # an index of an image that changed since is refused with the fix
    base.write_bytes(base.read_bytes())
    proc = mirrorfs("replay", "--state", state, "--index", index, check=False)
    assert proc.returncode == 1 and "rebuild the index" in proc.stderr

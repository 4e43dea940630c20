"""Acceptance, issue 3 "Fidelity on randomized workloads": the events replayed on T equal the snapshot at T'.

Each workload runs through a real kernel (the TCG guest, and the host kernel through qemu-storage-daemon) on
every file-system variant; `mirrorfs replay` turns the recorded write log into events. Then:
- apply_events(T, events) == T' with zero differences (tests/fidelity/replay.py, tree.py), except the mtime of a
  directory last changed by its entries and the size of a directory (no event carries them: entry changes are the
  entries' events);
- no error events, no spurious modify (ranges that changed nothing);
- no false negatives: every net change flushed by a sync appears, interval by interval, in order;
- no false positives: every event matches an op of the workload (tests/fidelity/check.py has both rules).
The busybox guest has no setfattr, so xattr ops run only through the host runner.

MIRRORFS_FIDELITY_EXAMPLES sets how many hypothesis workloads each variant and runner gets (default 2),
MIRRORFS_FIDELITY_SEED which ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.fidelity.check import check_false_negatives, check_false_positives, check_model, entry_mtime_dirs
from tests.fidelity.replay import apply_events
from tests.fidelity.runner import RUNNERS, VARIANTS, Run, host_python, record, replay, replay_available
from tests.fidelity.tree import Tree, diff_trees, snapshot_image
from tests.fidelity.workload import Op, fixed_workload, model_after, to_shell, workloads
from tests.support import require, require_root, require_tools

pytestmark = pytest.mark.integration
EXAMPLES = int(os.environ.get("MIRRORFS_FIDELITY_EXAMPLES", "2"))
SEED = int(os.environ.get("MIRRORFS_FIDELITY_SEED", "20240601"))  # fixed: CI sees the same workloads every run
SHOW = 40  # differences listed per kind in a failure message
BASE_TREES: dict[str, Tree] = {}  # variant -> tree at T (apply_events never mutates it)


def _requirements(runner: str) -> None:
    require_root()
    require_tools("losetup", "mount", "tune2fs", "qemu-system-x86_64" if runner == "guest" else "qemu-storage-daemon")


def _final_content(final: Tree):
    """content(path, ino) for apply_events: the final disk's bytes of that inode (any of its paths)."""
    by_ino = {e.ino: e for e in final.values() if e.type == "file"}

    def content(path: str, ino: int) -> bytes | None:
        e = by_ino.get(ino) or final.get(path)
        return e.data if e is not None and e.type == "file" else None
    return content


def _section(title: str, lines: list[str], show: int = SHOW) -> str:
    if not lines:
        return ""
    more = f"\n  ... and {len(lines) - show} more (report.txt)" if len(lines) > show else ""
    return f"\n{title} ({len(lines)}):\n  " + "\n  ".join(lines[:show]) + more


def fidelity(ops: list[Op], variant: str, runner: str, workdir: Path) -> Run:
    """Record, replay and judge one workload; raises AssertionError listing every problem found."""
    xattrs = runner == "host"
    script = to_shell(ops, python=host_python() if xattrs else None)
    run = record(variant, runner, script, workdir)
    t0 = time.monotonic()
    if variant not in BASE_TREES:  # every run of a variant starts from the same image: snapshot it once
        BASE_TREES[variant] = snapshot_image(run.base, run.fstype)
    before, after = BASE_TREES[variant], snapshot_image(run.disk, run.fstype)
    run.seconds["snapshots"] = time.monotonic() - t0
    model = check_model(model_after(ops), after)  # the harness itself: the kernel did what the model says
    assert not model, "workload did not do what its model predicts (a harness bug):" + _section("model", model)
    require(replay_available(), "`mirrorfs replay` is not built yet (issue 3)")
    events = replay(run)
    t0 = time.monotonic()
    replayed = apply_events(before, events, _final_content(after))
    diffs = diff_trees(replayed, after, ino=True, skip_mtime=entry_mtime_dirs(ops), dir_size=False)
    negatives = check_false_negatives(ops, events)
    positives = check_false_positives(ops, events)
    run.seconds["check"] = time.monotonic() - t0
    sections = {"replay failures": replayed.failures, "tree differences (replayed vs T')": diffs,
                "false negatives": negatives, "false positives": positives}
    (workdir / "events.jsonl").write_text("".join(ev.to_json() + "\n" for ev in events), encoding="utf-8")
    (workdir / "workload.sh").write_text(script, encoding="utf-8")
    (workdir / "report.txt").write_text("".join(_section(t, ls, len(ls)) for t, ls in sections.items()))
    report = "".join(_section(t, ls) for t, ls in sections.items())
    assert not report, (f"{variant}/{runner}: {len(events)} events, timings {run.seconds}; "
                        f"workload, events and full report in {workdir}{report}")
    return run


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fixed_workload(tmp_path: Path, variant: str, runner: str) -> None:
    """Every op kind once, syncs between phases (xattr ops only where setxattr exists: the host runner)."""
    _requirements(runner)
    run = fidelity(fixed_workload(xattrs=runner == "host"), variant, runner, tmp_path)
    print(f"{variant}/{runner}: {len(run.events)} events, {run.seconds}")


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_workloads(tmp_path_factory: pytest.TempPathFactory, variant: str, runner: str) -> None:
    """hypothesis workloads from a fixed seed (same ones on every CI run); no shrinking: each example is a boot."""
    _requirements(runner)

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(ops=workloads(xattrs=runner == "host"))
    def check(ops: list[Op]) -> None:
        fidelity(ops, variant, runner, tmp_path_factory.mktemp(f"{variant}-{runner}"))

    check()

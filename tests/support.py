"""Shared test plumbing: the rule that a missing real dependency fails under MIRRORFS_REQUIRE_ALL=1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MIRRORFS_CACHE", REPO / ".cache"))


def require(condition: bool, why: str) -> None:
    """Skip when a real dependency is missing, or fail when MIRRORFS_REQUIRE_ALL=1 (CI): no silent skips."""
    if condition:
        return
    if os.environ.get("MIRRORFS_REQUIRE_ALL") == "1":
        pytest.fail(f"required dependency missing: {why} (run `make test`, which installs it)")
    pytest.skip(why)


def require_tools(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None, f"{name} not on PATH")


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (loop devices, mounts)")


def ext4_base_and_disk(tmp_path: Path, seed: Path | None = None, size: int = 32 << 20) -> tuple[Path, Path]:
    """A fresh ext4 image (its tables initialized now, so no lazy init writes later; with `seed`'s files in it) as
    the base, and a copy of it as the disk a writer changes: the pair an attach with --base starts from."""
    import subprocess

    base, disk = tmp_path / "base.raw", tmp_path / "disk.raw"
    with open(base, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    *(["-d", str(seed)] if seed is not None else []), str(base)], check=True, capture_output=True)
    shutil.copyfile(base, disk)
    return base, disk

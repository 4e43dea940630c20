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

"""`--diff` (events, publish): a unified diff of a changed text file, from the store the engine keeps.

A modify or truncate event carries `sha256` (content after) and `old_sha256` (before); the engine kept the bytes of
both under those hashes in DIR/blobs.db if the file was small text (inference/blobs.py). The diff is difflib's
unified diff of the two, line by line ("\\n" ends a line, nothing else does), labelled a/PATH and b/PATH, with
"\\ No newline at end of file" after a last line without one, as diff(1) writes it. When there can be no diff the
event says why in `diff_skipped` (mirrorfs-events(5) lists the reasons), never an exception: the content is the
guest's and may be anything.

difflib's matcher is quadratic on some inputs (64 KiB of alternating changed lines took 3.3 s), so each diff has a
deterministic work budget (WORK_BUDGET lines scanned by its longest-match searches, ~0.15 s here): over it, the
event says so, and the same event says the same thing on every run.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference.blobs import BlobReader

DIFF_KINDS = frozenset(("modify", "truncate"))
WORK_BUDGET = 2_000_000
MAX_DIFF = 64 << 10  # characters of diff text: more is skipped, so one event stays small in a stream entry
NO_NEWLINE = "\n\\ No newline at end of file\n"


class _OverBudget(Exception):
    pass


class _Budgeted(difflib.SequenceMatcher):
    """difflib's matcher, counting the spans its longest-match searches scan; raises past the budget."""

    def __init__(self, a: list[str], b: list[str], budget: int) -> None:
        self.budget = budget
        super().__init__(None, a, b)

    def find_longest_match(self, alo=0, ahi=None, blo=0, bhi=None):
        self.budget -= (ahi - alo) + (bhi - blo)
        if self.budget < 0:
            raise _OverBudget
        return super().find_longest_match(alo, ahi, blo, bhi)


def split_lines(text: str) -> list[str]:
    """Lines as diff(1) sees them: each ends at "\\n" (kept); \\r, form feeds and Unicode separators do not end one."""
    lines = [line + "\n" for line in text.split("\n")]
    last = lines.pop()[:-1]
    if last:
        lines.append(last)
    return lines


def unified_diff(old: str, new: str, path: str, budget: int = WORK_BUDGET) -> str | None:
    """difflib.unified_diff of the two texts as one string (see the module docstring); None: over the budget."""
    a, b = split_lines(old), split_lines(new)
    try:
        _Budgeted(a, b, budget).get_matching_blocks()  # the same matcher unified_diff runs, budgeted, first
    except _OverBudget:
        return None
    return "".join(line if line.endswith("\n") else line + NO_NEWLINE
                   for line in difflib.unified_diff(a, b, "a" + path, "b" + path))


class Differ:
    """Adds `diff` or `diff_skipped` to the modify and truncate events of regular files of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.store = BlobReader(Path(state_dir) / "blobs.db")

    def reason_or_diff(self, get: Callable[[str], Any]) -> tuple[str | None, str | None]:
        """(diff, None) or (None, why not) for an event whose fields `get` returns; (None, None): not one that
        gets a diff (another kind, not a regular file)."""
        if get("kind") not in DIFF_KINDS or get("type") != "file":
            return None, None
        if get("hash_skipped"):
            return None, "larger than the hash limit"
        new_sha, old_sha = get("sha256"), get("old_sha256")
        if not isinstance(new_sha, str):
            return None, "not hashed"
        if not isinstance(old_sha, str):
            return None, "content before unknown"
        limit = self.store.file_limit
        if any(isinstance(n, int) and n > limit for n in (get("size"), get("old_size"))):
            return None, f"larger than the diff limit ({limit} bytes)"
        old, new = self.store.get(old_sha), self.store.get(new_sha)
        if old is None or new is None:
            return None, "not kept"
        if not (old[0] and new[0]):
            return None, "binary"
        path = get("path")
        text = unified_diff(old[1].decode(errors="replace"), new[1].decode(errors="replace"),
                            path if isinstance(path, str) else "")
        if text is None:
            return None, "too costly to diff"
        if len(text) > MAX_DIFF:
            return None, f"diff longer than {MAX_DIFF} characters"
        return text, None

    def add_to_dict(self, d: dict[str, Any]) -> bool:
        """Set d's diff or diff_skipped; True if it got either."""
        diff, why = self.reason_or_diff(d.get)
        if diff is not None:
            d["diff"] = diff
        elif why is not None:
            d["diff_skipped"] = why
        return diff is not None or why is not None

    def add_to_event(self, ev) -> None:
        ev.diff, ev.diff_skipped = self.reason_or_diff(lambda k: getattr(ev, k, None))

    def close(self) -> None:
        self.store.close()

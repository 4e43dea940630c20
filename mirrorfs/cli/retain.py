"""Retention on the command line (issue 14): `attach --retain/--retain-size/--min-free/--segment-size` parsing,
and `fold`, the child process an attach runs to fold the oldest log segments into a checkpoint (tap/retention.py)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?", re.IGNORECASE)
_SIZE_UNIT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hour|d|day|w|week)s?", re.IGNORECASE)
_DURATION_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400,
                  "w": 604800, "week": 604800}


def size(text: str) -> int:
    """A size: bytes, or with K, M, G, T (powers of 1024; KiB, MB etc. read the same)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (give bytes or a number with K, M, G or T, "
                                         "e.g. 10G, 512M)")
    value = int(float(m.group(1)) * _SIZE_UNIT[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be more than 0")
    return value


def duration(text: str) -> float:
    """A duration in seconds: a number with s, min (or m), h, d or w, e.g. 90s, 30min, 2h, 7d."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (give a number with s, min, h, d or w, e.g. "
                                         "2h, 30min, 7d)")
    value = float(m.group(1)) * _DURATION_UNIT[m.group(2).lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be more than 0")
    return value


def min_free(text: str) -> tuple[float, int]:
    """--min-free: a share of the file system (5%) or a size (20G): (fraction, bytes), the other 0."""
    t = text.strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            pct = -1
        if not 0 <= pct < 100:
            raise argparse.ArgumentTypeError(f"--min-free {text!r}: a share is 0% to 99% of the file system")
        return pct / 100, 0
    return 0.0, size(t)


def add_attach_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retain", type=duration, metavar="DURATION",
                   help="keep this much history (e.g. 2h, 7d): older write-log segments are folded into a checkpoint "
                        "(the disk and its index at the last folded seq) and removed, online; cat, restore, mount "
                        "--at, replica and replay start at the checkpoint and refuse anything before it (default: "
                        "keep everything). See RETENTION in mirrorfs-attach(1)")
    p.add_argument("--retain-size", type=size, metavar="SIZE",
                   help="keep at most this much write log (e.g. 10G): the oldest segments are folded as with --retain")
    p.add_argument("--min-free", type=min_free, metavar="SIZE|PCT%",
                   help="with retention: fold the oldest history whenever free space on the state directory's file "
                        "system is under this (default: the larger of 5%% and 1G), even history the engine has not "
                        "read yet, so a full state disk never stalls the guest")
    p.add_argument("--segment-size", type=size, default=64 << 20, metavar="SIZE",
                   help="size of a write-log segment (default 64M): retention folds and removes whole segments")


def retention_policy(args: argparse.Namespace):
    """The attach's tap.retention Policy, or None when no retention option was given."""
    from tap.retention import Policy

    if args.retain is None and args.retain_size is None and args.min_free is None:
        return None
    floor = {} if args.min_free is None else {"min_free_fraction": args.min_free[0], "min_free_bytes": args.min_free[1]}
    return Policy(keep_s=args.retain, keep_bytes=args.retain_size, **floor)


def fold_command(state: Path, base, group: str | None):
    """`fold_cmd` of tap.attach.Attachment: the fold child for a seq (`base()`: the attach's base by then)."""
    def cmd(until: int, force: bool) -> list[str]:
        b = base()
        return ([sys.executable, "-m", "mirrorfs.cli.retain", "--state", str(state), "--until", str(until)]
                + (["--force"] if force else [])
                + (["--base", str(b)] if b is not None else []) + (["--group", group] if group else []))
    return cmd


def cmd_fold(args: argparse.Namespace) -> None:
    from inference.engine import build_index
    from inference.errors import CorruptMetadata
    from tap.retention import fold
    from tap.state import StateDir

    try:
        os.nice(10)  # a background chore: the attach's ack path and the engine come first
    except OSError:
        pass
    state = StateDir(args.state)
    size_ = state.require_state()["size"]

    def index(image: Path, out: Path) -> None:
        try:
            build_index(image, out)
        except CorruptMetadata as exc:  # no readable file system at this point: replays scan the image instead
            raise ValueError(str(exc)) from exc
    fold(state.path, state.log, size_, args.until, base=args.base, index=index, force=args.force,
         on_gap=lambda gap: print(f"mirrorfs: warning: {gap}; the checkpoint lacks their writes", file=sys.stderr,
                                  flush=True))  # the attach says what was folded


def main(argv: list[str] | None = None) -> int:
    """The fold child (`python -m mirrorfs.cli.retain`): not a command of its own, only what an attach runs."""
    import logging

    from tap.retention import RetentionError
    from tap.state import StateError, set_group

    p = argparse.ArgumentParser(prog="mirrorfs-fold", description="Fold the write log up to SEQ (the end of a "
                                "segment) into a checkpoint and remove the segments it replaces: what `mirrorfs "
                                "attach --retain` runs (mirrorfs-attach(1) RETENTION).")
    p.add_argument("--state", required=True, type=Path, metavar="DIR")
    p.add_argument("--until", type=int, required=True, metavar="SEQ")
    p.add_argument("--base", type=Path, metavar="IMAGE", help="the base image, for the first checkpoint")
    p.add_argument("--group", metavar="GROUP", help="as attach --group")
    p.add_argument("--force", action="store_true",
                   help="free space is short: remove the folded history even if a reader (cat, replay) uses it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mirrorfs: %(message)s")
    try:
        set_group(args.group)
        cmd_fold(args)
    except (RetentionError, StateError, ValueError, OSError) as exc:
        print(f"mirrorfs: fold: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

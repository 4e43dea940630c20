"""The event-stream subcommands of `mirrorfs`: events filters, publish, collect, status (issue 5).

Kept apart from main.py so that the parsers and commands of the stream layer live together; main.py only
registers them (`add_parsers`, `COMMANDS`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mirrorfs.stream.filters import Filter, FilterError


def add_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", action="append", default=[], metavar="GLOB",
                   help="only events whose path (or old path) matches GLOB; ** spans directories, "
                        "e.g. '/etc/**' (repeatable: any of them)")
    p.add_argument("--kind", action="append", default=[], metavar="KIND",
                   help="only events of this kind: create, mkdir, modify, delete, rename, ... (repeatable)")
    p.add_argument("--fs", action="append", default=[], metavar="FS", help="only this file system (repeatable)")
    p.add_argument("--vm", dest="vm_filter", action="append", default=[], metavar="VM",
                   help="only this VM (repeatable)")


def filter_from_args(args: argparse.Namespace) -> Filter:
    try:
        return Filter.make(paths=args.path, kinds=args.kind, fs=args.fs, vm=args.vm_filter)
    except FilterError as exc:
        raise ValueError(f"bad filter: {exc}") from None


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", dest="json", action="store_true", help="JSON lines (mirrorfs-events(5))")
    g.add_argument("--human", dest="json", action="store_false", help="one readable line per event (default)")


def add_format_args(p: argparse.ArgumentParser) -> None:
    """events only: --format (bodyfile for forensic timelines) and --timefmt (issue 14)."""
    p.add_argument("--format", choices=["text", "json", "bodyfile"],
                   help="text (default), json (as --json), or bodyfile: The Sleuth Kit's body format, one line an "
                        "event, for `mactime -b FILE` timelines (MD5 column 0, deleted names end in ' (deleted)')")
    p.add_argument("--timefmt", metavar="FMT",
                   help="the text format's time stamp: a strftime(3) format as inotifywait --timefmt takes "
                        "(e.g. '%%Y-%%m-%%dT%%H:%%M:%%S%%z'), or iso: ISO-8601 with microseconds and the zone "
                        "(default %%H:%%M:%%S, local time)")


def _redis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", required=True, metavar="URL",
                   help="redis://[user@]host:port/db (rediss:// for TLS); never a password here: everyone sees argv")
    p.add_argument("--redis-password-file", type=Path, metavar="FILE",
                   help="read the Redis password from FILE (one line; keep it 0600); default: the REDISCLI_AUTH "
                        "environment variable, as redis-cli")


def _password(args: argparse.Namespace) -> str | None:
    from mirrorfs.stream.publish import redis_password

    return redis_password(args.redis, args.redis_password_file)


def add_parsers(sub) -> None:
    from mirrorfs.stream.publish import DEFAULT_MAXLEN, DEFAULT_REGISTRY

    p = sub.add_parser(
        "publish", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="send a state directory's mutation events to a Redis stream",
        description="Follow DIR/events.jsonl and XADD each matching event to a Redis stream (one stream per VM), "
                    "in pipelined batches, with an approximate MAXLEN cap. Each entry's ID is the event id "
                    "(SEQ-N), so Redis itself refuses a re-sent event: delivery is at least once from the "
                    "publisher and exactly once into the stream. The position is saved in DIR/publish.json, so "
                    "a restart resumes; a lost connection is retried with backoff. See mirrorfs-publish(1).",
        epilog="examples:\n  mirrorfs publish --state st/vm1 --redis redis://central:6379/0\n"
               "  mirrorfs publish --state st/vm1 --redis redis://central:6379/0 --path '/etc/**' --path '/root/**'")
    p.add_argument("--state", required=True, type=Path, metavar="DIR", help="state directory of one watched disk")
    _redis_args(p)
    p.add_argument("--stream", metavar="NAME", help="stream key (default mirrorfs:events:HOST:VM)")
    p.add_argument("--maxlen", type=int, default=DEFAULT_MAXLEN, metavar="N",
                   help=f"approximate cap on the stream's length (XADD MAXLEN ~; default {DEFAULT_MAXLEN})")
    p.add_argument("--batch", type=int, default=500, metavar="N", help="events per pipelined round trip")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, metavar="KEY",
                   help=f"set the stream name is added to, for collectors (default {DEFAULT_REGISTRY})")
    p.add_argument("--once", action="store_true", help="stop at the end of the event log instead of following")
    p.add_argument("--diff", action="store_true",
                   help="modify and truncate events of text files carry a unified diff (`diff`) or why not "
                        "(`diff_skipped`), made here from DIR/blobs.db, so it travels in the stream (see "
                        "events --diff)")
    add_filter_args(p)

    p = sub.add_parser(
        "collect", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="central monitoring agent: read the event streams of many hosts and VMs",
        description="Read every mirrorfs stream (the registry set, and keys matching --pattern) through a Redis "
                    "consumer group; print or act on the matching events, per VM in seq order and without "
                    "duplicates; XACK each event once handled. See mirrorfs-collect(1).",
        epilog="examples:\n  mirrorfs collect --redis redis://central:6379/0 --path '/etc/**' --json\n"
               "  mirrorfs collect --redis redis://central:6379/0 --kind create --exec 'logger -t mirrorfs'")
    _redis_args(p)
    p.add_argument("--group", default="mirrorfs", metavar="G", help="consumer group (default mirrorfs)")
    p.add_argument("--consumer", metavar="NAME", help="consumer name in the group (default: the host name)")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, metavar="KEY", help="set of stream names to read")
    p.add_argument("--pattern", default="mirrorfs:events:*", metavar="GLOB",
                   help="also read streams whose key matches (SCAN MATCH; '' to disable)")
    p.add_argument("--start", choices=["begin", "now"], default="begin",
                   help="where a new group starts in a stream: its oldest entry (default) or new entries only")
    p.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                   help="run CMD (split like a shell would, never run by one) with the event's path as its last "
                        "argument, for each matching event; MIRRORFS_EVENT holds the event's JSON")
    p.add_argument("--count", type=int, metavar="N", help="exit after N matching events")
    p.add_argument("--idle-exit", type=float, metavar="SECONDS",
                   help="exit once no event came for this long (for scripts and tests)")
    p.add_argument("--diff", action="store_true",
                   help="show the diffs a `publish --diff` put in events (diff, diff_skipped: in JSON, in "
                        "MIRRORFS_EVENT, and indented under the text line); without it they are left out")
    add_filter_args(p)
    add_output_args(p)

    p = sub.add_parser("status", help="a human summary of a state directory",
                       description="Summarize a state directory: attach state, write log size and last seq, "
                                   "event count, engine lag, publisher position.")
    p.add_argument("--state", required=True, type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true", help="the same as one JSON object")


def cmd_publish(args: argparse.Namespace) -> None:
    from mirrorfs.stream.publish import Publisher
    from tap.state import StateDir

    state = StateDir(args.state)
    state.require_state()
    pub = Publisher(state.path, args.redis, stream=args.stream, flt=filter_from_args(args), maxlen=args.maxlen,
                    batch=args.batch, registry=args.registry, password=_password(args), diff=args.diff)
    print(f"mirrorfs: publishing {state.path / 'events.jsonl'} to {pub.stream} from {pub.position_text()}",
          file=sys.stderr, flush=True)
    pub.run(follow=not args.once)
    print(f"mirrorfs: published {pub.stats['sent']} events ({pub.stats['duplicates']} already there, "
          f"{pub.stats['filtered']} filtered out)", file=sys.stderr)


def cmd_collect(args: argparse.Namespace) -> None:
    from mirrorfs.stream.collect import Collector

    coll = Collector(args.redis, group=args.group, consumer=args.consumer, registry=args.registry,
                     pattern=args.pattern, flt=filter_from_args(args), start=args.start, password=_password(args))
    coll.run(as_json=args.json, exec_cmd=args.exec_cmd, count=args.count, idle_exit=args.idle_exit,
             diff=args.diff)


def cmd_status(args: argparse.Namespace) -> None:
    from mirrorfs.stream.status import format_status, gather_status

    info = gather_status(args.state)
    print(json.dumps(info, indent=1) if args.json else format_status(info))


def require_events(state) -> Path:
    """A recorded state directory's events.jsonl, or a clear error saying how to make it."""
    state.require_state()
    path = state.path / "events.jsonl"
    if not path.exists():
        raise ValueError(f"no event log in {state.path}: run `mirrorfs replay --state {state.path} --base IMAGE` "
                         "or attach with --base/--index")
    return path


def cmd_events(args: argparse.Namespace) -> None:
    from inference.eventlog import read_events
    from mirrorfs.stream.render import format_bodyfile, format_event
    from tap.state import StateDir

    state = StateDir(args.state)
    path = require_events(state)
    flt = filter_from_args(args)
    fmt = "json" if args.json else getattr(args, "format", None) or "text"
    timefmt = getattr(args, "timefmt", None)
    differ = None
    if getattr(args, "diff", False) and fmt != "bodyfile":
        from mirrorfs.stream.diffs import Differ
        differ = Differ(state.path)
    for ev in read_events(path, args.since, follow=args.follow):
        if flt.matches(ev):
            if differ is not None:
                differ.add_to_event(ev)
            line = format_bodyfile(ev) if fmt == "bodyfile" else format_event(ev, fmt == "json", timefmt)
            if line is not None:
                print(line, flush=args.follow)


COMMANDS = {"publish": cmd_publish, "collect": cmd_collect, "status": cmd_status}


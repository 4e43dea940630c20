"""No false negatives, no false positives: the workload's ops against the engine's events.

The rule for false negatives works per sync interval, because the engine sees consistency points (jbd2 commits,
home locations agreeing), not syscalls. Between two syncs we take the model's net change: every name that appeared
or disappeared, every inode whose content, mode, owner, mtime (utime) or xattrs changed. Each must show up as an
event, and the intervals in order (interval k's events before interval k+1's). An op undone before the next sync
(a file created and deleted in between) is not required: with the 5 s jbd2 commit it may be in no commit at all.
A rename across a directory renamed in the same interval may be named by old or new path, so removals accept both.

The rule for false positives: every event must match an op of a compatible kind on a path the affected inode had
in that op's sync interval (the engine sees states at consistency points, not syscalls: a file written and renamed
between two syncs may be reported as modified under its old name, then renamed), or under any path its directory
had in that interval (a file deleted before its ancestor is renamed may be reported deleted under the new path,
after the rename). Also allowed, not required: `attrib` on a directory whose entries changed in that window (its
mtime really changed); `rename` for a link whose old name is removed before the next sync (the two states are the
same); `link` for a rename of a file with several names (which of its names moved is not on the disk).

Directory mtimes: an event is about the inode whose attributes changed, and an entry change in a directory is
reported as the entry's event, not as an extra attrib of the directory. So a directory whose mtime was last set by
an entry change (rather than by utime) cannot be replayed exactly: `entry_mtime_dirs` names them, and the tree
comparison skips their mtime only. A directory's mtime set by utime and untouched since must still be exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from inference.events import Mutation
from tests.fidelity.tree import Tree
from tests.fidelity.workload import TOP, Model, Op, View, basename, join, model_after, parent

APPEAR = frozenset({"create", "mkdir", "symlink", "mknod", "link", "rename"})
CONTENT = frozenset({"modify", "truncate"})
OP_KINDS = {  # op -> the event kinds it may cause on the inode it touches
    # a write may leave the bytes as they were (same byte over same byte) and still set mtime: attrib
    "create": {"create"}, "write": {"create", "modify", "truncate", "attrib"}, "append": {"modify", "attrib"},
    "overwrite": {"modify", "attrib"}, "truncate": {"truncate", "modify", "attrib"}, "rename": {"rename"},
    "link": {"link", "rename"}, "symlink": {"symlink"}, "mknod": {"mknod"}, "chmod": {"attrib"}, "chown": {"attrib"},
    "utime": {"attrib"}, "setxattr": {"xattr"}, "rmxattr": {"xattr"}, "mkdir": {"mkdir"}, "rmdir": {"rmdir"},
    "unlink": {"delete"}, "bulk": {"mkdir", "create"},
}


@dataclass(frozen=True)
class Required:
    """One thing an interval must show; `match` says whether an event shows it."""

    what: str
    match: Callable[[Mutation], bool]


def _views(ops: list[Op], with_base: bool) -> list[View]:
    """The model's view before the first op and after each op."""
    m = Model(with_base)
    views = [m.view()]
    for op in ops:
        m.apply(op)
        views.append(m.view())
    return views


def _dentries(v: View) -> dict[tuple[int, str], tuple[int, str]]:
    return {(v[parent(p)].id, basename(p)): (s.id, p) for p, s in v.items() if p != "/"}


def _paths_of(v: View) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for p, s in v.items():
        out.setdefault(s.id, set()).add(p)
    return out


def required(v0: View, v1: View, between: list[View] | None = None) -> list[Required]:
    """What the net change from sync point v0 to sync point v1 obliges the events to show. Content and attribute
    changes may be named by any path the inode had in the interval (`between`: the views in it): the engine
    reports what it sees when it sees it, e.g. a truncate under the old name of a file renamed later."""
    d0, d1 = _dentries(v0), _dentries(v1)
    paths1 = _paths_of(v1)
    seen: dict[int, set[str]] = {}
    for v in [v0, *(between or []), v1]:
        for ident, ps in _paths_of(v).items():
            seen.setdefault(ident, set()).update(ps)
    by_id0 = {s.id: s for s in v0.values()}
    by_id1 = {s.id: s for s in v1.values()}
    reqs: list[Required] = []

    def on(paths: set[str], kinds: frozenset[str], what: str, xattr_field: bool = False) -> None:
        reqs.append(Required(what, lambda ev: ev.path in paths and (
            ev.kind in kinds or (xattr_field and ev.xattr is not None))))

    for key, (ident, path) in d1.items():
        if d0.get(key, (None,))[0] != ident:
            on({path}, APPEAR, f"{path!r} appears ({by_id1[ident].type})")
    for key, (ident, path) in d0.items():
        if key in d1:  # still there, or replaced by a rename over it: the appearance covers it
            continue
        cands = {path}
        pid = key[0]
        if pid in paths1:
            cands |= {join(p, key[1]) for p in paths1[pid]}
        moved_to = paths1.get(ident, set())
        reqs.append(Required(f"{path!r} disappears", lambda ev, c=cands, m=moved_to: (
            (ev.kind in ("delete", "rmdir") and ev.path in c)
            or (ev.kind == "rename" and (ev.old_path in c or ev.path in m)))))
    for ident, s1 in by_id1.items():
        s0 = by_id0.get(ident)
        ps = seen[ident]
        name = min(paths1[ident])
        if s0 is None:
            if s1.xattrs:
                on(ps, frozenset({"xattr"}), f"{name!r} new with xattrs", xattr_field=True)
            continue
        if s1.type == "file" and (s0.digest, s0.size) != (s1.digest, s1.size):
            on(ps, CONTENT, f"{name!r} content changes")
        # (a base file's mode is unknown to the model: a chmod of it may set the mode it already had)
        if (s0.uid, s0.gid) != (s1.uid, s1.gid) or None not in (s0.mode, s1.mode) and s0.mode != s1.mode:
            mode = oct(s1.mode) if s1.mode is not None else "?"
            on(ps, frozenset({"attrib"}), f"{name!r} mode/owner {mode} {s1.uid}:{s1.gid}")
        if s0.stamp != s1.stamp and not s1.entry_mtime:
            on(ps, frozenset({"attrib"}) | CONTENT, f"{name!r} mtime set")
        if s0.xattrs != s1.xattrs:
            on(ps, frozenset({"xattr"}), f"{name!r} xattrs change", xattr_field=True)
    return reqs


def check_false_negatives(ops: list[Op], events: list[Mutation], with_base: bool = True) -> list[str]:
    """Every flushed net change appears, interval by interval, in order."""
    views = _views(ops, with_base)
    syncs = [0, *(i + 1 for i, op in enumerate(ops) if op.kind == "sync")]
    if syncs[-1] != len(ops):
        syncs.append(len(ops))  # the runners sync at the end
    problems: list[str] = []
    cursor = 0
    for k, (a, b) in enumerate(zip(syncs, syncs[1:], strict=False)):
        last = cursor - 1
        missing: list[str] = []
        for req in required(views[a], views[b], views[a + 1:b]):
            hit = next((i for i in range(cursor, len(events)) if req.match(events[i])), None)
            if hit is None:
                early = next((i for i in range(cursor) if req.match(events[i])), None)
                missing.append(req.what + (": no event" if early is None
                                           else f": only event #{early}, before earlier intervals"))
            else:
                last = max(last, hit)
        where = f"interval {k} (ops {a}..{b - 1})"
        if len(missing) > 20:  # a missed bulk create: one line, not hundreds
            problems.append(f"{where}: {len(missing)} changes without an event, e.g. {missing[:3]}")
        else:
            problems += [f"{where}: {m}" for m in missing]
        cursor = last + 1
    return problems


def allowed_events(ops: list[Op], with_base: bool = True) -> set[tuple[str, str]]:
    """(kind, path) pairs that some op explains; see the module doc."""
    views = _views(ops, with_base)
    next_sync, last_sync = len(ops), 0
    windows: list[int] = [0] * len(ops)
    starts: list[int] = [0] * len(ops)
    for i in range(len(ops) - 1, -1, -1):
        if ops[i].kind == "sync":
            next_sync = i
        windows[i] = next_sync
    for i, op in enumerate(ops):
        starts[i] = last_sync
        if op.kind == "sync":
            last_sync = i + 1
    ok: set[tuple[str, str]] = set()
    dir_paths: dict[tuple[int, int], dict[int, set[str]]] = {}  # per window: inode id -> its paths in it
    for i, op in enumerate(ops):
        if op.kind == "sync":
            continue
        before, after = views[i], views[i + 1]
        touched = {s.id for p, s in after.items()
                   if p in (op.path, op.dest) or (op.kind == "bulk" and p.startswith(op.path + "/"))}
        touched |= {before[p].id for p in (op.path, op.dest) if p in before}
        dirs = {after[q].id for q in (parent(op.path), parent(op.dest or op.path)) if q in after}
        dirs |= {before[q].id for q in (parent(op.path), parent(op.dest or op.path)) if q in before}
        if op.kind == "bulk":
            dirs |= {after[op.path].id}
        kinds = OP_KINDS[op.kind] | ({"delete", "rmdir"} if op.kind == "rename" else set())
        if op.kind == "rename" and op.path in before and len(_paths_of(before).get(before[op.path].id, ())) > 1:
            kinds |= {"link"}  # which of a multi-link file's names moved is not on the disk: a link and a delete
        changes_entries = op.kind in ("create", "rename", "link", "symlink", "mknod", "mkdir", "rmdir", "unlink",
                                      "bulk") or (op.kind == "write" and op.path not in before)
        window = (starts[i], windows[i])
        if window not in dir_paths:  # every path each inode had in the window
            dir_paths[window] = {}
            for v in views[window[0]:window[1] + 1]:
                for p, s in v.items():
                    dir_paths[window].setdefault(s.id, set()).add(p)
        for v in views[window[0]:window[1] + 1]:
            for p, s in v.items():
                if s.id in touched:
                    # under any path its directory had in the window: an ancestor renamed in the same interval
                    # may be renamed before or after this op, the disk cannot tell
                    dirs_at = dir_paths[window].get(v[parent(p)].id, ()) if p != "/" else ()
                    ok |= {(kind, q) for kind in kinds for q in {p, *(join(d, basename(p)) for d in dirs_at)}}
                if changes_entries and s.id in dirs:
                    ok.add(("attrib", p))
    return ok


def check_false_positives(ops: list[Op], events: list[Mutation], with_base: bool = True) -> list[str]:
    """Events no op explains. A rename seen as link + delete (ext2 writes the two directories' blocks apart, so the
    engine may see the inode under both names) is reported as such: the state is right, the rename is lost."""
    ok = allowed_events(ops, with_base)
    out = []
    for i, ev in enumerate(events):
        if ev.kind == "error" or (ev.kind, ev.path) in ok:
            continue
        hint = " (a rename reported as link/delete)" if ev.kind in ("link", "delete") and \
            ("rename", ev.path) in ok else ""
        out.append(f"event #{i} seq {ev.seq}: {ev.kind} {ev.path!r}" + (f" (from {ev.old_path!r})" if ev.old_path
                                                                         else "") + f" matches no op{hint}")
    return out


def check_model(model: Model, tree: Tree) -> list[str]:
    """The harness checking itself: the tree a kernel left must be what the model predicts (mtimes excepted:
    the model does not know the clock). Paths under TOP must be exactly the model's; elsewhere only known ones."""
    problems: list[str] = []
    view = model.view()
    for p in sorted(p for p in tree if p.startswith(TOP + "/") and p not in view):
        problems.append(f"{p!r} on disk, not in the model")
    groups: dict[int, set[str]] = {}
    for p, s in view.items():
        e = tree.get(p)
        if e is None:
            problems.append(f"{p!r} in the model, not on disk")
            continue
        groups.setdefault(s.id, set()).add(p)
        want = {"type": "fifo" if s.type == "fifo" else s.type, "uid": s.uid, "gid": s.gid, "target": s.target}
        if s.mode is not None:  # None: a base directory the model only knows by name
            want["mode"] = s.mode
            want["xattrs"] = {k: v.hex() for k, v in s.xattrs}
        if s.type != "dir":
            want["size"] = s.size
        if s.digest is not None:
            want["sha256"] = s.digest
        for f, v in want.items():
            if getattr(e, f) != v:
                problems.append(f"{p!r}: {f} disk={getattr(e, f)!r} model={v!r}")
    owner: dict[int, int] = {}
    for ident, paths in groups.items():
        inos = {tree[p].ino for p in paths}
        if len(inos) > 1:
            problems.append(f"{sorted(paths)} are one inode in the model, {len(inos)} on disk")
        for ino in inos:
            if owner.setdefault(ino, ident) != ident:
                problems.append(f"{sorted(paths)} share disk inode {ino} with another model inode")
    return problems


def entry_mtime_dirs(ops: list[Op], with_base: bool = True) -> set[str]:
    """Final paths of directories whose mtime was last changed by an entry change (see the module doc)."""
    return {p for p, s in model_after(ops, with_base).view().items() if s.type == "dir" and s.entry_mtime}

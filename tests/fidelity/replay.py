"""Apply a Mutation stream to the tree at T: the result must be the tree at T' (issue 3, "Fidelity").

Events carry attributes but not content, so a file's bytes after a create or modify come from the final disk
(`content(path, ino)`): a missed modify then shows up as a hash difference against T'. A spurious modify cannot show
up that way, so each modify is also checked against its ranges: inside the file, and the content in at least one
range must differ from T's (unless the inode was created or truncated along the way). A truncate with no
modify derives the bytes from T's own, so it is checked too. Every event that cannot apply (create over an
existing path, rename of a missing one, ...) is a failure, never skipped silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import replace

from inference.events import Mutation
from tests.fidelity.tree import Entry, Tree

Content = Callable[[str, int], bytes | None]
NEW_TYPES = {"create": "file", "mkdir": "dir", "symlink": "symlink"}


class Replayed(dict[str, Entry]):
    """The replayed tree, with every failure met on the way (empty when the stream applied cleanly)."""

    def __init__(self, tree: Tree) -> None:
        super().__init__(tree)
        self.failures: list[str] = []


def _children(tree: Tree, path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    return [p for p in tree if p.startswith(prefix) and p != path]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _attrs(e: Entry, ev: Mutation) -> Entry:
    """The entry with every attribute the event carries (events hold the state after the change)."""
    mtime_ns = ev.mtime_ns if ev.mtime_ns is not None else round(ev.mtime * 1e9) if ev.mtime is not None else None
    changes = {k: v for k, v in (("size", ev.size), ("mode", ev.mode), ("uid", ev.uid), ("gid", ev.gid),
                                 ("mtime_ns", mtime_ns)) if v is not None}
    if ev.target is not None and e.type == "symlink":
        changes["target"] = ev.target
    if ev.xattr:
        xattrs = dict(e.xattrs)
        for name, value in ev.xattr.items():
            if value is None:
                xattrs.pop(name, None)
            else:
                xattrs[name] = value
        changes["xattrs"] = xattrs
    return replace(e, **changes)


def apply_events(tree_at_t: Tree, events: Iterable[Mutation], content: Content) -> Replayed:
    """Replay `events` onto a copy of `tree_at_t`; see the module doc for how content is judged."""
    out = Replayed(tree_at_t)
    fail = out.failures.append
    from_final: set[int] = set()  # inodes whose content must be read from the final disk
    created_or_truncated: set[int] = set()
    modifies: list[Mutation] = []

    def update_inode(path: str, ev: Mutation) -> None:
        """Attributes belong to the inode: every hard link of it changes with it."""
        e = out[path]
        new = _attrs(e, ev)
        for p in ([path] if e.type == "dir" else [q for q, x in out.items() if x.ino == e.ino and x.type != "dir"]):
            out[p] = replace(new, target=out[p].target)

    def check_new(ev: Mutation) -> bool:
        if ev.path in out:
            fail(f"seq {ev.seq}: {ev.kind} {ev.path!r} but it exists ({out[ev.path].type})")
            return False
        if out.get(_parent(ev.path), Entry("none", 0, 0, 0, 0, 0, 0)).type != "dir":
            fail(f"seq {ev.seq}: {ev.kind} {ev.path!r} but its parent is not a directory")
            return False
        return True

    for ev in events:
        k, path = ev.kind, ev.path
        if k == "error":
            fail(f"seq {ev.seq}: error event at {path!r}: {ev.message}")
        elif k in ("create", "mkdir", "symlink", "mknod"):
            if not check_new(ev):
                continue
            type_ = NEW_TYPES.get(k, ev.type)
            if ev.type not in (type_, "unknown") or type_ == "unknown":
                fail(f"seq {ev.seq}: {k} {path!r} with type {ev.type!r}")
            missing = [f for f in ("mode", "uid", "gid", "size") if getattr(ev, f) is None]
            if missing or (ev.mtime_ns is None and ev.mtime is None):
                fail(f"seq {ev.seq}: {k} {path!r} lacks {missing or ['mtime']}")
            e = _attrs(Entry(type_, 0, 0, 0, 0, 0, ev.ino, target=ev.target if type_ == "symlink" else None), ev)
            out[path] = e
            if type_ == "file":
                from_final.add(ev.ino)
                created_or_truncated.add(ev.ino)
        elif k == "link":
            if not check_new(ev):
                continue
            src = out.get(ev.target or "")
            if src is None:
                src = next((x for x in out.values() if x.ino == ev.ino and x.type != "dir"), None)
            if src is None or src.type == "dir":
                fail(f"seq {ev.seq}: link {path!r} to {ev.target!r} (ino {ev.ino}): no such non-directory")
                continue
            out[path] = replace(src)
            update_inode(path, ev)
        elif k in ("delete", "rmdir"):
            e = out.get(path)
            if e is None or (e.type == "dir") != (k == "rmdir"):
                fail(f"seq {ev.seq}: {k} {path!r} but it is {e.type if e else 'missing'}")
                if e is None:
                    continue
            if e.type == "dir" and (kids := _children(out, path)):
                fail(f"seq {ev.seq}: rmdir {path!r} but it holds {len(kids)} entries, e.g. {kids[0]!r}")
                for p in kids:
                    del out[p]
            del out[path]
        elif k == "rename":
            old = ev.old_path
            if old is None or old not in out:
                fail(f"seq {ev.seq}: rename {old!r} -> {path!r} but the source is missing")
                continue
            if path == old or path.startswith(old.rstrip("/") + "/"):
                fail(f"seq {ev.seq}: rename {old!r} into itself ({path!r})")
                continue
            if out.get(_parent(path), Entry("none", 0, 0, 0, 0, 0, 0)).type != "dir":
                fail(f"seq {ev.seq}: rename to {path!r} but its parent is not a directory")
                continue
            if path in out:  # over an existing name: it is replaced
                victim, moving = out[path], out[old]
                if (victim.type == "dir") != (moving.type == "dir"):
                    fail(f"seq {ev.seq}: rename {old!r} ({moving.type}) over {path!r} ({victim.type})")
                if victim.type == "dir" and _children(out, path):
                    fail(f"seq {ev.seq}: rename over non-empty directory {path!r}")
                for p in _children(out, path):
                    del out[p]
                del out[path]
            for p in [old, *_children(out, old)]:
                out[path + p[len(old):] if p != old else path] = out.pop(p)
            update_inode(path, ev)
        elif k in ("modify", "truncate", "attrib", "xattr"):
            e = out.get(path)
            if e is None:
                fail(f"seq {ev.seq}: {k} {path!r} but it is missing")
                continue
            if ev.ino and e.ino != ev.ino:
                fail(f"seq {ev.seq}: {k} {path!r} names ino {ev.ino}, the tree has {e.ino} there")
            if k in ("modify", "truncate") and e.type != "file":
                fail(f"seq {ev.seq}: {k} {path!r} of a {e.type}")
            if k == "truncate" and e.ino not in from_final:
                if e.data is None or ev.size is None:
                    from_final.add(e.ino)
                else:  # the bytes follow from T's: cut or zero-extended
                    data = e.data[:ev.size] + bytes(max(0, ev.size - len(e.data)))
                    for p in [q for q, x in out.items() if x.ino == e.ino]:
                        out[p] = replace(out[p], data=data, sha256=hashlib.sha256(data).hexdigest())
            if k == "truncate":
                created_or_truncated.add(e.ino)
            if k == "modify":
                from_final.add(e.ino)
                modifies.append(ev)
                size = ev.size if ev.size is not None else e.size
                for start, end in ev.ranges or []:
                    if not 0 <= start < end <= size:
                        fail(f"seq {ev.seq}: modify {path!r} range [{start}, {end}) outside the file (size {size})")
                if not ev.ranges:
                    fail(f"seq {ev.seq}: modify {path!r} without ranges")
            update_inode(path, ev)
        else:
            fail(f"seq {ev.seq}: unknown event kind {k!r}")

    finals: dict[int, bytes | None] = {}
    for p, e in out.items():
        if e.type == "file" and e.ino in from_final:
            if e.ino not in finals:
                finals[e.ino] = content(p, e.ino)
            data = finals[e.ino]
            if data is None:
                fail(f"{p!r}: no content for ino {e.ino} on the final disk")
                continue
            out[p] = replace(e, data=data, sha256=hashlib.sha256(data).hexdigest())

    before = {e.ino: e.data for e in tree_at_t.values() if e.type == "file"}
    for ev in modifies:  # a modify must change bytes in at least one of its ranges
        old, new = before.get(ev.ino), finals.get(ev.ino)
        if ev.ino in created_or_truncated or old is None or new is None or not ev.ranges:
            continue
        if all(old[s:e] == new[s:e] for s, e in ev.ranges):
            fail(f"seq {ev.seq}: modify {ev.path!r} ranges {ev.ranges} but those bytes equal T's")
    return out

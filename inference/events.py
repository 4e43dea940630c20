"""The Mutation event: the one currency after the tap, and its JSON-lines form (mirrorfs-events(5)).

Every event carries the inode's attributes as they are after the change, so a consumer can apply the
stream to a tree without reading the disk: replaying the events on the tree at T gives the tree at T'.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson


class Kind(StrEnum):
    """What happened (mirrorfs-events(5)). A str: it compares equal to, and serialises as, its name."""

    CREATE = "create"
    MKDIR = "mkdir"
    SYMLINK = "symlink"
    MKNOD = "mknod"
    LINK = "link"
    DELETE = "delete"
    RMDIR = "rmdir"
    RENAME = "rename"
    MODIFY = "modify"
    TRUNCATE = "truncate"
    ATTRIB = "attrib"
    XATTR = "xattr"
    ERROR = "error"  # only ever an ErrorEvent's


KINDS = tuple(k.value for k in Kind)
_JSON_TEXT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # what json.dumps would make per call
_JSON_ASCII = json.JSONEncoder(separators=(",", ":"))
# DEL, C1 controls, and the bidi embeddings, overrides and isolates: inside a JSON string each may stand as \\uXXXX
_TERMINAL_ACTIVE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
TYPES = ("file", "dir", "symlink", "chardev", "blockdev", "fifo", "socket", "unknown")


def _plain(f: float) -> bool:
    """A float that json and orjson both write positionally, alike (json writes 1e-05, orjson 0.00001)."""
    return f == 0 or 1e-4 <= abs(f) < 1e16


def _orjson_text(d: dict[str, Any]) -> str | None:
    """`d` as json.dumps(ensure_ascii=False, separators=(",", ":")) writes it (orjson: ~10k instructions per event
    against the json module's ~80k), or None where they could differ or orjson refuses: floats outside `_plain`
    (the caller checks the event's two), ints past 64 bits, lone surrogates (a name that is not UTF-8)."""
    try:
        return orjson.dumps(d).decode()
    except TypeError:  # (orjson.JSONEncodeError is one)
        return None


# Linux inode flags (FS_IOC_GETFLAGS, the values ext2/3/4 keep in i_flags) by the name events give them, with
# lsattr's letter. CHATTR_FLAGS are the ones a user sets (chattr): a change of one of them is an attrib event; the
# others (extents, index, inline_data, huge_file, ...) the file system sets itself and only show in `mirrorfs stat`.
INODE_FLAGS = {"secrm": (0x1, "s"), "unrm": (0x2, "u"), "compr": (0x4, "c"), "sync": (0x8, "S"),
               "immutable": (0x10, "i"), "append": (0x20, "a"), "nodump": (0x40, "d"), "noatime": (0x80, "A"),
               "encrypt": (0x800, "E"), "index": (0x1000, "I"), "journal_data": (0x4000, "j"),
               "notail": (0x8000, "t"), "dirsync": (0x10000, "D"), "topdir": (0x20000, "T"),
               "huge_file": (0x40000, "h"), "extents": (0x80000, "e"), "verity": (0x100000, "V"),
               "nocow": (0x800000, "C"), "dax": (0x2000000, "x"), "inline_data": (0x10000000, "N"),
               "projinherit": (0x20000000, "P"), "casefold": (0x40000000, "F")}
CHATTR_FLAGS = ("secrm", "unrm", "compr", "sync", "immutable", "append", "nodump", "noatime", "journal_data",
                "notail", "dirsync", "topdir", "nocow", "dax", "projinherit", "casefold")
CHATTR_MASK = sum(INODE_FLAGS[n][0] for n in CHATTR_FLAGS)
# What an entry event says of the directory it changed (Mutation.parent): what moves with entries, and no event
# of the guest's reports (its inotify says IN_CREATE for the name, nothing of the directory's new size).
DIR_FIELDS = ("ino", "size", "blocks", "links", "mtime_ns", "ctime_ns", "atime_ns")
ENTRY_KINDS = ("create", "mkdir", "symlink", "mknod", "link", "delete", "rmdir", "rename")


def flag_names(flags: int, mask: int = CHATTR_MASK) -> list[str]:
    """The names of the flags set in `flags` (those in `mask`), in bit order."""
    return [name for name, (bit, _) in sorted(INODE_FLAGS.items(), key=lambda kv: kv[1][0]) if flags & bit & mask]


def flag_bits(names: list[str]) -> int:
    """Back from names to bits (names not known are ignored)."""
    return sum(INODE_FLAGS[n][0] for n in set(names) if n in INODE_FLAGS)


@dataclass(slots=True)
class Mutation:
    seq: int                      # write-log seq of the record that completed the change
    time: float                   # host receive time of that record, seconds since the epoch
    kind: Kind                    # a plain str is taken too, and made a Kind
    path: str                     # absolute inside its file system, e.g. /etc/passwd
    vm: str = ""
    fs: str = ""                  # the file system: pN, label or UUID
    old_path: str | None = None   # rename: where it was
    ino: int = 0
    type: str = "unknown"
    size: int | None = None
    mode: int | None = None       # permission bits and set-id/sticky (S_IMODE), not the type
    uid: int | None = None
    gid: int | None = None
    mtime: float | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    atime_ns: int | None = None
    blocks: int | None = None     # st_blocks: the inode's i_blocks in 512-byte units
    links: int | None = None
    rdev: int | None = None
    flags: list[str] | None = None      # the chattr flags set (CHATTR_FLAGS), when any is, or when they changed
    old_flags: list[str] | None = None  # attrib: the chattr flags before, when they changed
    parent: dict[str, int] | None = None      # entry events: the directory `path` is in, after this consistency
    #                                           point (DIR_FIELDS): its size and blocks grow with its entries
    old_parent: dict[str, int] | None = None  # rename to another directory: the one `old_path` was in
    ranges: list[tuple[int, int]] | None = None  # modify: [start, end) byte ranges
    target: str | None = None     # symlink target; link: the existing path linked to
    xattr: dict[str, str | None] | None = None  # xattr: name -> new value (hex), None = removed
    message: str | None = None    # error: what was wrong, and what the engine did
    unconfirmed: bool | None = None  # True: a size shown without seeing its data written (bound or end); see reconcile
    sha256: str | None = None     # regular file: hex SHA-256 of its bytes at the point (inference/hashes.py)
    hash_skipped: bool | None = None  # True: a regular file larger than the hash limit, so no sha256
    old_size: int | None = None   # modify, truncate: the size shown before
    old_mode: int | None = None   # attrib: the values before, each only when it changed
    old_uid: int | None = None
    old_gid: int | None = None
    old_target: str | None = None  # a symlink whose target changed under the same inode: the target before
    old_sha256: str | None = None  # modify, truncate: the sha256 of the content before, when the engine hashed it
    diff: str | None = None        # added by readers asked for --diff (mirrorfs/stream/diffs.py), never by the engine
    diff_skipped: str | None = None  # --diff: why there is no diff (binary, not kept, ...)
    id: str | None = None         # "SEQ-N": N-th event (from 1) of that seq, given by the EventLog; stable position
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.kind) is not Kind:
            # (a dict first: the Enum call cost ~4 us per event); ValueError for a kind that does not exist
            self.kind = _KIND_OF.get(self.kind) or Kind(self.kind)
        if self.kind is Kind.ERROR and not isinstance(self, ErrorEvent):
            raise TypeError("an error is an ErrorEvent, not a Mutation of kind error")

    @property
    def is_error(self) -> bool:
        return isinstance(self, ErrorEvent)

    @property
    def position(self) -> tuple[int, int]:
        """(seq, N) from the id: totally ordered within one VM, for resume and dedupe; (seq, 0) without an id."""
        return parse_id(self.id) if self.id else (self.seq, 0)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id} if self.id else {}
        d |= {"seq": self.seq, "time": self.time, "vm": self.vm, "fs": self.fs, "kind": self.kind, "path": self.path}
        for name, value in zip(_OPTIONAL, _optional(self), strict=True):
            if value is not None and not (name == "ino" and self.kind == "error" and not value):
                d[name] = [list(r) for r in value] if name == "ranges" else value
        if self.extra:
            d.update(self.extra)
        return d

    def to_json(self) -> str:
        """One line of JSON (`event_json`), through orjson where it writes exactly what the json module does."""
        d = self.to_dict()
        plain = not self.extra and _plain(self.time) and (self.mtime is None or _plain(self.mtime))
        return event_json(d, _orjson_text(d) if plain else None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mutation:
        known = {f for f in Mutation.__slots__ if f != "extra"}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("ranges") is not None:
            kw["ranges"] = [tuple(r) for r in kw["ranges"]]
        made = ErrorEvent if kw.get("kind") == Kind.ERROR else Mutation
        return made(**kw, extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def from_json(cls, line: str) -> Mutation:
        return cls.from_dict(json.loads(line))


_OPTIONAL = ("old_path", "ino", "type", "size", "mode", "uid", "gid", "mtime", "mtime_ns", "ctime_ns", "atime_ns",
             "blocks", "links", "rdev", "flags", "old_flags", "parent", "old_parent", "ranges", "target", "xattr",
             "message", "unconfirmed", "sha256", "hash_skipped", "old_size", "old_mode", "old_uid", "old_gid",
             "old_target", "old_sha256", "diff", "diff_skipped")  # to_dict's fields after the fixed ones, in order
_optional = operator.attrgetter(*_OPTIONAL)  # (one C call, not 30 getattr: to_dict ran once per event)


@dataclass(slots=True)
class ErrorEvent(Mutation):
    """What the engine could not make a mutation of (hostile or inconsistent metadata, a gap in the log), on
    the same stream, in seq order; `message` says what was wrong and what the engine did. Consumers that apply
    mutations (the view, reads) pass these by (`is_error`)."""


def event_json(d: dict[str, Any], text: str | None = None) -> str:
    """An event's dict as one line of JSON (`text`: already encoded so); names that are not UTF-8 become \\udcXX
    escapes (lossless, still valid JSON), and so, as \\uXXXX, do characters a terminal would act on that JSON
    leaves raw (DEL, C1 controls such as the 8-bit CSI, bidi overrides): a guest's name (or file content, in a
    diff) printed with `events --json` cannot drive the terminal."""
    if text is None:
        text = _JSON_TEXT.encode(d)
    if text.isascii():  # (O(1): CPython knows) no surrogate, no C1 or bidi character: only DEL to look for
        return text if "\x7f" not in text else text.replace("\x7f", "\\u007f")
    try:
        text.encode()
    except UnicodeEncodeError:
        return _JSON_ASCII.encode(d)
    return _TERMINAL_ACTIVE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_KIND_OF: dict[str, Kind] = {k.value: k for k in Kind}


def parse_id(event_id: str) -> tuple[int, int]:
    """"SEQ-N" -> (SEQ, N); ValueError if it is not one."""
    seq, sep, n = event_id.partition("-")
    if not sep or not seq.isdigit() or not n.isdigit():
        raise ValueError(f"not an event id (SEQ-N): {event_id!r}")
    return int(seq), int(n)


def format_id(seq: int, n: int) -> str:
    return f"{seq}-{n}"


def fs_path(raw: bytes) -> str:
    """A guest path as text: UTF-8 where valid, other bytes kept reversibly (surrogateescape)."""
    return raw.decode("utf-8", "surrogateescape")


def path_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")

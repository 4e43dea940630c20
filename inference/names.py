"""The name policy at the engine's edge, and the one way guest names are shown to a human.

A directory entry's name comes from the guest. Linux allows any bytes in a name except '/' and NUL, and '.' and
'..' are the first two entries of every directory; the engine lets a name become a path component only if it is
one a Linux kernel could have created, so everything downstream (the shadow tree, the view, the poke helper, the
stream) can trust every component. Other bytes (control characters, escape sequences, non-UTF-8) are legal and
stay: JSON carries them losslessly, and human-readable output escapes them with `escape_name`, as `ls -b` does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

_SPECIAL = frozenset({b"", b".", b".."})
REAL_DOT, REAL_DOTDOT = 0, 1  # positions of a directory's own '.' and '..' among its entries (on-disk order)


def bad_name_reason(name: bytes) -> str | None:
    """Why `name` may not be a path component (None: it may). '.' and '..' are always refused here: the real
    ones are told apart by their position (see `split_entries`)."""
    if not name:
        return "empty name"
    if name == b".":
        return "an extra '.' entry"
    if name == b"..":
        return "an extra '..' entry"
    if b"/" in name:
        return "'/' in the name"
    if b"\0" in name:
        return "NUL in the name"
    return None


def all_valid(names: Collection[bytes]) -> bool:
    """Is every one of these names a valid path component? (one pass over them all: the common case)"""
    blob = b"".join(names)
    return b"/" not in blob and b"\0" not in blob and _SPECIAL.isdisjoint(names)


def split_entries(entries: Iterable[tuple[int, bytes]]) -> tuple[dict[bytes, int], int | None,
                                                                 list[tuple[bytes, int, str]]]:
    """A directory's listing (entry inode, raw name), in on-disk order, as: its valid names, its parent (the
    inode of the real '..', None if it has none) and the refused entries (name, inode, why). The real '.' and
    '..' are the first and second entries; any other '.' or '..' is refused, like every other bad name.
    (Runs on every directory read: a directory with nothing to refuse is checked in one pass over its names.)"""
    entries = entries if isinstance(entries, list) else list(entries)
    if len(entries) >= 2 and entries[0][1] == b"." and entries[1][1] == b"..":
        rest = entries[2:]     # the usual case: checked for the whole directory at once
        if all_valid([name for _, name in rest]):
            return {name: ino for ino, name in rest}, entries[1][0], []
    good: dict[bytes, int] = {}
    parent = None
    bad: list[tuple[bytes, int, str]] = []
    for pos, (ino, name) in enumerate(entries):
        if name in _SPECIAL or b"/" in name or b"\0" in name:
            if pos == REAL_DOT and name == b".":
                continue
            if pos == REAL_DOTDOT and name == b"..":
                parent = ino
                continue
            bad.append((name, ino, bad_name_reason(name) or "bad name"))
            continue
        good[name] = ino
    return good, parent, bad


_C_ESCAPES = {0x07: "\\a", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v", 0x0C: "\\f", 0x0D: "\\r",
              0x5C: "\\\\"}


def escape_name(text: object) -> str:
    """A guest name or path, safe to print on a terminal: C escapes as `ls -b` writes them (\\n, \\t, \\\\ ...),
    every other non-printable character (control characters, ESC, DEL, bidi overrides) and every byte that is
    not UTF-8 as a three-digit octal escape of its bytes (\\033, \\377). Printable text and spaces stay as they
    are. Accepts the surrogateescape form the engine uses for non-UTF-8 bytes (inference.events.fs_path), raw
    bytes, and None (""); anything else (a field of a JSON event from elsewhere) is shown as its str()."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    elif not isinstance(text, str):
        text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    out: list[str] = []
    for ch in text:
        c = ord(ch)
        if c in _C_ESCAPES:
            out.append(_C_ESCAPES[c])
        elif 0xDC80 <= c <= 0xDCFF:        # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\{c - 0xDC00:03o}")
        elif 0xD800 <= c <= 0xDFFF:        # a lone surrogate from elsewhere (JSON \\uXXXX): not encodable
            out.append(f"\\u{c:04x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode())
    return "".join(out)

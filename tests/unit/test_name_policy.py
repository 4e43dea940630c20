"""The name policy (inference/names.py) and the one escape for guest names in text output."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.events import ErrorEvent, Kind, Mutation, fs_path
from inference.names import bad_name_reason, escape_name, split_entries
from mirrorfs.stream.render import format_event

BAD = [b"", b".", b"..", b"../PWNED", b"SLASH/XX", b"/", b"a/", b"/a", b"NUL\0NAME", b"\0", b"a\0/b"]
LEGAL = [b"...", b".x", b"..x", b"x..", b". ", b"ctl\nname", b"\x1b[31mred", b"tab\there", b"nonutf8\xff",
         b"\x7f", b"\\", b"caf\xc3\xa9", b"\xe2\x80\xae" + b"txt.exe", b"a" * 255, b"-rf", b" "]


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_bad_names_are_refused(name: bytes) -> None:
    assert bad_name_reason(name) is not None


@pytest.mark.parametrize("name", LEGAL, ids=repr)
def test_odd_but_legal_names_stay(name: bytes) -> None:
    assert bad_name_reason(name) is None


@given(st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\0" not in n
                                                    and n not in (b".", b"..")))
def test_every_other_name_is_legal(name: bytes) -> None:
    assert bad_name_reason(name) is None


def test_only_the_first_two_entries_are_the_real_dot_and_dotdot() -> None:
    listing = [(12, b"."), (2, b".."), (13, b"a"), (14, b"."), (15, b".."), (16, b"../x"), (17, b"b\nc"),
               (18, b""), (19, b"..."), (20, b"d/e"), (21, b"f\0")]
    good, parent, bad = split_entries(listing)
    assert parent == 2  # the real '..', not the extra one that points at 15
    assert good == {b"a": 13, b"b\nc": 17, b"...": 19}
    assert [(n, i) for n, i, _ in bad] == [(b".", 14), (b"..", 15), (b"../x", 16), (b"", 18), (b"d/e", 20),
                                           (b"f\0", 21)]
    assert all(why for _, _, why in bad)


def test_dot_entries_out_of_place_are_refused() -> None:
    """A '..' first or a '.' second is not where ext puts them: refused, and the directory has no parent."""
    good, parent, bad = split_entries([(2, b".."), (12, b"."), (13, b"a")])
    assert parent is None and good == {b"a": 13} and {n for n, _, _ in bad} == {b".", b".."}


def _reference(listing: list[tuple[int, bytes]]):
    good, parent, bad = {}, None, []
    for pos, (ino, name) in enumerate(listing):
        if (pos, name) == (0, b"."):
            continue
        if (pos, name) == (1, b".."):
            parent = ino
            continue
        if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
            bad.append((name, ino))
        else:
            good[name] = ino
    return good, parent, bad


@given(st.lists(st.tuples(st.integers(1, 50), st.lists(st.sampled_from(b"./\0a"), max_size=3).map(bytes)),
                max_size=12), st.booleans())
def test_split_entries_matches_the_rule(listing: list[tuple[int, bytes]], dots: bool) -> None:
    """The one-pass check of a whole directory and the entry-by-entry one give the same answer."""
    if dots:
        listing = [(7, b"."), (3, b"..")] + listing
    good, parent, bad = split_entries(listing)
    assert (good, parent, [(n, i) for n, i, _ in bad]) == _reference(listing)
    assert split_entries(iter(listing))[:2] == (good, parent)


def test_empty_listing() -> None:
    assert split_entries([]) == ({}, None, [])


# ---------------------------------------------------------------- escaping, as ls -b does

@pytest.mark.parametrize(("raw", "shown"), [
    (b"plain name.txt", "plain name.txt"),
    (b"a\nb", "a\\nb"),
    (b"\x1b[31mred", "\\033[31mred"),
    (b"\x01\t\r", "\\001\\t\\r"),
    (b"\x07\x08\x0b\x0c", "\\a\\b\\v\\f"),
    (b"x\\y", "x\\\\y"),
    (b"\x7f", "\\177"),
    (b"\xff", "\\377"),
    (b"caf\xe9", "caf\\351"),                 # Latin-1: not UTF-8
    ("café".encode(), "café"),               # printable UTF-8 stays
    (b"\xe2\x80\xae", "\\342\\200\\256"),     # RIGHT-TO-LEFT OVERRIDE: not printable, its bytes in octal
    (b"\xc2\x9b", "\\302\\233"),              # C1 CSI
    (b"", ""),
])
def test_escape_like_ls_b(raw: bytes, shown: str) -> None:
    assert escape_name(raw) == shown
    assert escape_name(fs_path(raw)) == shown  # the engine's str form (surrogateescape) gives the same


def test_escape_other_values() -> None:
    assert escape_name(None) == ""
    assert escape_name(42) == "42"
    assert escape_name("\ud800") == "\\ud800"  # a lone surrogate from foreign JSON: shown, not a crash


@given(st.binary(max_size=64))
def test_escaped_text_has_no_control_bytes_and_is_unambiguous(raw: bytes) -> None:
    shown = escape_name(raw)
    assert shown.isprintable()
    shown.encode("utf-8")  # printable to any UTF-8 terminal, no surrogates left
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in shown)
    assert _unescape(shown) == raw  # nothing is lost: two names never look the same


def _unescape(shown: str) -> bytes:
    simple = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, "\\": 92}
    out, i = bytearray(), 0
    while i < len(shown):
        c = shown[i]
        if c != "\\":
            out += c.encode()
            i += 1
        elif shown[i + 1] in simple:
            out.append(simple[shown[i + 1]])
            i += 2
        else:
            out.append(int(shown[i + 1:i + 4], 8))
            i += 4
    return bytes(out)


def test_json_lines_carry_no_terminal_active_character_raw() -> None:
    """DEL, C1 controls (8-bit CSI) and bidi overrides in a guest name stand as \\uXXXX in the JSON line, which
    still gives the exact name back; other characters stay as they are."""
    name = "/a\x9b31m\u202eb\x7f\u2066é"
    for path in (name, name + "\udcff"):  # valid UTF-8, and a name that is not
        line = Mutation(seq=1, time=0.0, kind="create", path=path).to_json()
        assert not any(ch in line for ch in "\x7f\x9b\u202e\u2066"), line
        assert json.loads(line)["path"] == path
    assert "é" in Mutation(seq=1, time=0.0, kind="create", path=name).to_json()


def test_text_rendering_of_events_escapes_every_guest_string() -> None:
    name = fs_path(b"/\x1b]0;pwned\x07/ctl\nname\xff")
    ev = Mutation(seq=7, time=time.time(), kind="rename", path=name, old_path=fs_path(b"/old\x1b[2J"), fs="p1",
                  vm="vm\x1b", ino=5, type="file")
    line = format_event(ev, as_json=False)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), repr(line)
    assert "\\033]0;pwned\\a/ctl\\nname\\377" in line and "/old\\033[2J" in line
    link = Mutation(seq=8, time=time.time(), kind="symlink", path="/l", target=fs_path(b"\x1b[31m"))
    assert "-> \\033[31m" in format_event(link, as_json=False)
    err = ErrorEvent(seq=9, time=time.time(), kind=Kind.ERROR, path="/d\n", message="bad\x1b")
    assert format_event(err, as_json=False).endswith("/d\\n: bad\\033")
    # JSON keeps the name losslessly
    back = Mutation.from_json(format_event(ev, as_json=True))
    assert back.path == name and fs_path(back.path.encode("utf-8", "surrogateescape")) == name
    assert "\n" not in format_event(ev, as_json=True)
    assert json.loads(format_event(ev, as_json=True))["old_path"] == fs_path(b"/old\x1b[2J")


def test_the_reconciler_drops_a_bad_name_that_got_past_a_handler() -> None:
    """The last gate: a Change listing '../x' (a handler that forgot the policy) creates nothing, reports it."""
    from inference.reconcile import Change, Context, Reconciler
    from inference.shadow import ROOT_INO, Node, ShadowTree

    tree = ShadowTree()
    tree.add_node(Node(ino=ROOT_INO, type="dir", mode=0o40755, links=2))
    node = Node(ino=12, type="file", mode=0o100644, links=1)
    ok = Node(ino=13, type="file", mode=0o100644, links=1)
    change = Change(inodes={12: node, 13: ok}, dirs={ROOT_INO: {b"../x": 12, b"ok": 13}})
    events, _ = Reconciler(tree).apply(change, Context(seq=3, time=1.0), settled=True)
    assert tree.children[ROOT_INO] == {b"ok": 13}
    assert [e.path for e in events if e.kind == "create"] == ["/ok"]
    err = [e for e in events if e.kind == "error"]
    assert len(err) == 1 and err[0].extra["name_hex"] == b"../x".hex() and err[0].extra["entry_ino"] == 12
    assert err[0].path == "/" and err[0].ino == ROOT_INO

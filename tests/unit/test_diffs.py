"""--diff without a disk (issue 14 item 4): the text rule, the diff store's bound, old_sha256 and the keeping of
bytes in the hasher, the diff and every reason for none, and how text output shows a hostile file's diff."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path

from inference.blobs import ROW_COST, BlobReader, BlobStore, is_text
from inference.events import Mutation
from inference.hashes import Hasher
from mirrorfs.stream.diffs import MAX_DIFF, Differ, split_lines, unified_diff
from mirrorfs.stream.render import format_event


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ev(seq: int, kind: str, path: str, ino: int, **kw) -> Mutation:
    return Mutation(seq=seq, time=1.0, kind=kind, path=path, ino=ino, type=kw.pop("type", "file"), **kw)


def test_text_rule() -> None:
    assert is_text(b"") and is_text(b"plain\n") and is_text("naïve ✓\n".encode())
    assert is_text(b"\x1b[31mred\x1b[0m\r\n")          # control characters are text (the renderer escapes them)
    assert not is_text(b"a\0b")                         # a NUL: binary
    assert not is_text("caf\xe9".encode("latin-1"))     # not UTF-8: binary
    assert not is_text("text".encode("utf-16"))         # UTF-16 has NULs
    assert not is_text(b"\xed\xa0\x80")                 # a UTF-8-encoded surrogate is not valid UTF-8


def test_store_stays_within_its_bound_and_evicts_oldest_first(tmp_path: Path) -> None:
    limit = 256 << 10
    store = BlobStore(tmp_path / "blobs.db", limit=limit, file_limit=4096)
    first = b"the first version\n"
    store.keep(sha(first), first)
    for i in range(30_000):  # many files changed: rows of text and of binaries, each counted
        data = (f"file {i}\n" * (i % 50)).encode() if i % 3 else b"\0" + i.to_bytes(4, "little")
        store.keep(sha(data), data)
        if i % 500 == 0:
            store.commit()
        if i == 20_000:
            store.keep(sha(b"kept again\n"), b"kept again\n")
        if i == 29_990:
            store.keep(sha(b"kept again\n"), b"kept again\n")  # seen again: new again, so not evicted
    store.keep(sha(b"x" * 4097), b"x" * 4097)  # over the file limit: not kept at all
    store.commit()
    assert store.total <= limit and store.evicted > 0
    assert (tmp_path / "blobs.db").stat().st_size <= 2 * limit  # SQLite's pages: the bound holds on disk too
    reader = BlobReader(tmp_path / "blobs.db")
    assert reader.get(sha(first)) is None                          # the oldest went first
    assert reader.get(sha(b"kept again\n")) == (True, b"kept again\n")
    last = (b"file 29999\n" * (29_999 % 50))
    assert reader.get(sha(last)) == (True, last)
    binary = b"\0" + (29_997).to_bytes(4, "little")  # i % 3 == 0: a binary
    assert reader.get(sha(binary)) == (False, None)                # a binary: a row without its bytes
    assert reader.get(sha(b"x" * 4097)) is None
    count, total = reader.db.execute("SELECT COUNT(*), SUM(cost) FROM blob").fetchone()
    assert total == store.total and count * ROW_COST <= limit
    reader.close()
    store.close()
    again = BlobStore(tmp_path / "blobs.db", limit=limit, file_limit=4096)  # the bound is kept across runs
    assert again.total == total
    again.close()


def test_damaged_store_costs_diffs_not_errors(tmp_path: Path) -> None:
    assert BlobReader(tmp_path / "none.db").get(sha(b"a")) is None
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    assert BlobReader(tmp_path / "junk.db").get(sha(b"a")) is None
    store = BlobStore(tmp_path / "junk.db")  # the writer starts it again
    store.keep(sha(b"a\n"), b"a\n")
    store.keep(sha(b"b\n"), b"b\n")
    store.db.execute("UPDATE blob SET data=? WHERE sha=?", (b"forged\n", bytes.fromhex(sha(b"b\n"))))
    store.close()
    reader = BlobReader(tmp_path / "junk.db")
    assert reader.get(sha(b"a\n")) == (True, b"a\n")
    assert reader.get(sha(b"b\n")) is None  # bytes that are not the version's: not kept
    failing = BlobStore(tmp_path / "fails.db")
    failing.db.close()                       # as a full disk would fail it: given up, the engine goes on
    failing.keep(sha(b"c\n"), b"c\n")
    failing.commit()
    failing.close()
    assert failing.failed


def test_hasher_carries_old_sha256_and_keeps_bytes(tmp_path: Path) -> None:
    content = {5: b"one\ntwo\n", 6: b"\0\1\2", 7: b"base file\n"}
    reads: list[int] = []

    def read(ino: int, off: int, n: int) -> bytes:
        reads.append(ino)
        return content[ino][off:off + n]

    store = BlobStore(tmp_path / "blobs.db", file_limit=64)
    h = Hasher(read, limit=1 << 20, store=store)
    evs = [ev(1, "create", "/a", 5, size=8), ev(1, "create", "/bin", 6, size=3)]
    h.stamp(evs)
    assert evs[0].old_sha256 is None  # a create has no content before
    filled = [ev(2, "create", "/c", 9, size=0), ev(2, "modify", "/c", 9, size=4)]  # made and filled at one point
    content[9] = b"abc\n"
    h.stamp(filled)
    assert filled[0].sha256 == sha(b"") and filled[1].old_sha256 == sha(b"")
    content[5] = b"one\nTWO\n"
    later = [ev(2, "modify", "/a", 5, size=8), ev(2, "attrib", "/a", 5, size=8), ev(2, "truncate", "/a", 5, size=8)]
    h.stamp(later)
    assert later[0].sha256 == sha(b"one\nTWO\n") and later[0].old_sha256 == sha(b"one\ntwo\n")
    assert later[1].old_sha256 is None                        # not a content change
    assert later[2].old_sha256 == sha(b"one\nTWO\n")          # the file's previous event's, at the same point
    # a file on the base that nothing hashed yet: hashed when a data write is about to reach it
    h.before_change(7, 10)
    assert reads.count(7) == 1
    h.before_change(7, 10)
    assert reads.count(7) == 1                                # kept: once per version
    content[7] = b"base file, changed\n"
    mod = [ev(3, "modify", "/etc/x", 7, size=19)]
    h.stamp(mod)
    assert mod[0].old_sha256 == sha(b"base file\n")
    h.before_change(8, 100)                                   # over the store's file limit: not read
    assert 8 not in reads
    # too large for the hash: no claim about the content before the next change either
    big = [ev(4, "modify", "/a", 5, size=2 << 20)]
    h.stamp(big)
    content[5] = b"small again\n"
    after = [ev(5, "modify", "/a", 5, size=12)]
    h.stamp(after)
    assert big[0].hash_skipped and after[0].old_sha256 is None
    store.close()
    reader = BlobReader(tmp_path / "blobs.db")
    assert reader.get(sha(b"one\ntwo\n")) == (True, b"one\ntwo\n")
    assert reader.get(sha(b"base file\n")) == (True, b"base file\n")
    assert reader.get(sha(b"\0\1\2")) == (False, None)


def test_diff_is_difflibs_and_every_reason_for_none(tmp_path: Path) -> None:
    old, new = b"alpha\nbeta\ngamma\n", b"alpha\nBETA\ngamma\ndelta"  # the new one ends without a newline
    store = BlobStore(tmp_path / "blobs.db", file_limit=1024)
    for data in (old, new, b"\0bin", b"\0bin2"):
        store.keep(sha(data), data)
    store.close()
    differ = Differ(tmp_path)

    def run(**kw) -> tuple[str | None, str | None]:
        e = ev(9, kw.pop("kind", "modify"), "/etc/conf", 3, **kw)
        differ.add_to_event(e)
        return e.diff, e.diff_skipped

    diff, why = run(size=len(new), sha256=sha(new), old_sha256=sha(old), old_size=len(old))
    want = "".join(difflib.unified_diff(["alpha\n", "beta\n", "gamma\n"], ["alpha\n", "BETA\n", "gamma\n", "delta"],
                                        "a/etc/conf", "b/etc/conf"))
    want = want.replace("+delta", "+delta\n\\ No newline at end of file\n")
    assert why is None and diff == want
    assert run(size=3, sha256=sha(old), old_sha256=sha(old)) == ("", None)  # rewritten the same: empty diff
    assert run(kind="attrib", size=3, sha256=sha(old)) == (None, None)      # not a content change: no field
    assert run(kind="create", size=3, sha256=sha(old)) == (None, None)
    assert run(hash_skipped=True, size=1 << 30)[1] == "larger than the hash limit"
    assert run(size=3)[1].startswith("not hashed")
    assert run(size=3, sha256=sha(new))[1].startswith("content before unknown")
    assert run(size=4096, sha256=sha(new), old_sha256=sha(old))[1] == "larger than the diff limit (1024 bytes)"
    assert run(size=3, sha256=sha(b"\0bin2"), old_sha256=sha(b"\0bin"))[1] == "binary"
    assert run(size=3, sha256=sha(new), old_sha256=sha(b"\0bin"))[1] == "binary"
    assert run(size=3, sha256=sha(new), old_sha256=sha(b"evicted"))[1].startswith("not kept")
    assert run(size=3, sha256="not hex", old_sha256=sha(old))[1].startswith("not kept")
    d = {"kind": "modify", "type": "file", "path": "/etc/conf", "size": 3, "sha256": sha(new), "old_sha256": sha(old)}
    assert differ.add_to_dict(d) and d["diff"] == want
    differ.close()


def test_hostile_diffs_are_bounded() -> None:
    n = 64 << 10
    old = "".join(f"{i}\n" for i in range(n // 7))
    new = "".join(f"{i}\n" if i % 2 else f"y{i}\n" for i in range(n // 7))  # 3.3 s in plain difflib
    assert unified_diff(old, new, "/f") is None                             # over the work budget, every time
    huge = unified_diff("a\n" * 40_000, "b\n" * 40_000, "/f")               # cheap, but a long diff
    assert huge is not None and len(huge) > MAX_DIFF
    assert split_lines("a\rb\x0cc\u2028d\ne") == ["a\rb\x0cc\u2028d\n", "e"]  # only \n ends a line
    assert split_lines("") == [] and split_lines("x\n") == ["x\n"]


def test_text_output_escapes_a_diff_and_json_carries_it() -> None:
    e = ev(7, "modify", "/etc/motd", 4, size=30)
    e.diff = "--- a/etc/motd\n+++ b/etc/motd\n@@ -1 +1 @@\n-hi\n+\x1b]0;owned\x07\x1b[2J\u202e\r\n"
    text = format_event(e, False)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text and "\r" not in text
    lines = text.split("\n")
    assert len(lines) == 6 and lines[1] == "    --- a/etc/motd" and lines[5].startswith("    +\\033]0;owned")
    line = e.to_json()
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert json.loads(line)["diff"] == e.diff
    e.diff, e.diff_skipped = None, "binary"
    assert format_event(e, False).endswith("(no diff: binary)")

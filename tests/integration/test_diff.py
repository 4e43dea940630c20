"""--diff (issue 14 item 4) with a real kernel writer, and through a real redis-server to a collector.

The host kernel writes ext4 through qemu-storage-daemon (images/hostwriter.py) while a live `mirrorfs attach --base`
records and its engine keeps small text files' versions in DIR/blobs.db. The writer changes three files, each with a
sync and a pause between versions: a text file it made (lines changed, one with an escape sequence, lines added), a
binary file, and a text file that was on the base image (never hashed before its change: its old bytes are kept
just before the first data write reaches them). Afterwards:
- `events --diff --json` gives each text change exactly difflib's unified diff of the writer's two versions, the
  binary one `diff_skipped: binary`; the text format shows the diff escaped, indented under its event. (The disk
  may pass through a version between the two, e.g. the new bytes at the old size before the inode's commit: then
  the change is a chain of events, old_sha256 to sha256, from the writer's first version to its second, and each
  link's diff is that of its two versions, the middle one read from the store by its hash.)
- `publish --diff` into redis-server carries the diffs: `collect --diff` prints them, `collect` without leaves
  them out.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from images.hostwriter import HostWriter
from inference.blobs import BlobReader
from tests.redisfixture import RedisServer
from tests.support import ext4_base_and_disk, require_root, require_tools
from tests.tapharness import Attach, mirrorfs

pytestmark = pytest.mark.integration

PAUSE = 0.6

DOC1 = "".join(f"line {i}: the quick brown fox\n" for i in range(40))
DOC2 = DOC1.replace("line 7: the quick", "line 7: a \x1b[31mred\x1b[0m") \
           .replace("line 30: the quick brown fox\n", "") + "added at the end\nand no newline"
CONF1 = "# base config\nport = 22\nuser = root\nlog = info\n"
CONF2 = CONF1.replace("port = 22", "port = 2222")


def sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def want_diff(old: str, new: str, path: str) -> str:
    """difflib's unified diff of the two versions, as mirrorfs-events(5) says --diff gives it."""
    def lines(t: str) -> list[str]:
        out = [x + "\n" for x in t.split("\n")]
        last = out.pop()[:-1]
        return out + [last] if last else out
    return "".join(x if x.endswith("\n") else x + "\n\\ No newline at end of file\n"
                   for x in difflib.unified_diff(lines(old), lines(new), "a" + path, "b" + path))


def overwrite(path: Path, data: bytes) -> None:
    """Write in place, without O_TRUNC (so one change, one modify event), then cut to length, then sync."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate(len(data))
    subprocess.run(["sync"], check=True)


def the_change(events: list[dict], path: str, old: str | bytes, new: str | bytes) -> list[dict]:
    """The events that took `path` from the writer's version `old` to `new`, linked by old_sha256 -> sha256 (events
    that left the content as it was, such as a second modify of one point, are no links)."""
    mine = [e for e in events if e["path"] == path and e.get("old_sha256") not in (None, e.get("sha256"))]
    chain = [e for e in mine if e["old_sha256"] == sha(old)]
    assert len(chain) == 1, [(e["kind"], e.get("old_sha256"), e.get("sha256")) for e in mine]
    while chain[-1]["sha256"] != sha(new):
        nxt = [e for e in mine if e["old_sha256"] == chain[-1]["sha256"]]
        assert len(nxt) == 1 and len(chain) < 5, [(e["kind"], e.get("old_sha256"), e.get("sha256")) for e in mine]
        chain.append(nxt[0])
    return chain


def check_diffs(chain: list[dict], state: Path, old: str, new: str, path: str) -> None:
    """Each link's diff is difflib's of its two versions: the writer's at the ends, the store's in between."""
    store = BlobReader(state / "blobs.db")
    texts = [old] + [store.get(e["sha256"])[1].decode() for e in chain[:-1]] + [new]
    for e, a, b in zip(chain, texts, texts[1:], strict=False):
        assert e["diff"] == want_diff(a, b, path), e
    store.close()


def test_events_publish_and_collect_diff_a_real_writers_changes(tmp_path: Path) -> None:
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "mke2fs", "fusermount3", "redis-server")
    seed = tmp_path / "seed"
    (seed / "etc").mkdir(parents=True)
    (seed / "etc" / "conf").write_text(CONF1)
    base, disk = ext4_base_and_disk(tmp_path, seed)
    state = tmp_path / "state"
    bin1 = bytes(range(256)) * 16
    bin2 = bin1[:1000] + b"\0changed\0" + bin1[1009:]
    with HostWriter(disk, tmp_path / "qsd") as hw:
        with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), log=tmp_path / "attach.log") as attach:
            mnt = hw.mount()
            (mnt / "doc.txt").write_text(DOC1)
            (mnt / "blob.bin").write_bytes(bin1)
            subprocess.run(["sync"], check=True)
            time.sleep(PAUSE)
            overwrite(mnt / "doc.txt", DOC2.encode())
            overwrite(mnt / "blob.bin", bin2)
            overwrite(mnt / "etc" / "conf", CONF2.encode())
            time.sleep(PAUSE)
            hw.unmount()
            attach.detach()
    assert (state / "blobs.db").stat().st_mode & 0o777 == 0o600  # guest data: root's, as the state dir's files

    events = [json.loads(x) for x in mirrorfs("events", "--state", state, "--diff", "--json").stdout.splitlines()]
    doc = the_change(events, "/doc.txt", DOC1, DOC2)
    check_diffs(doc, state, DOC1, DOC2, "/doc.txt")
    assert any("+line 7: a \x1b[31mred" in e["diff"] for e in doc)
    conf = the_change(events, "/etc/conf", CONF1, CONF2)  # on the base: kept before the write reached it
    check_diffs(conf, state, CONF1, CONF2, "/etc/conf")
    binary = the_change(events, "/blob.bin", bin1, bin2)
    assert all(e["diff_skipped"] == "binary" and "diff" not in e for e in binary)
    plain = [json.loads(x) for x in mirrorfs("events", "--state", state, "--json").stdout.splitlines()]
    assert not any("diff" in e or "diff_skipped" in e for e in plain)  # only when asked

    text = mirrorfs("events", "--state", state, "--diff", "--path", "/doc.txt").stdout
    assert "\x1b" not in text
    assert "\n    +line 7: a \\033[31mred\\033[0m brown fox\n" in text
    assert "\n    \\\\ No newline at end of file" in text  # a backslash shown as `ls -b` shows it
    assert "(no diff: binary)" in mirrorfs("events", "--state", state, "--diff", "--path", "/blob.bin").stdout

    with RedisServer(tmp_path / "redis") as redis:
        stream = "mirrorfs:events:t:diff"
        mirrorfs("publish", "--state", state, "--redis", redis.url, "--stream", stream, "--once", "--diff",
                 "--kind", "modify", "--kind", "truncate")
        got = mirrorfs("collect", "--redis", redis.url, "--json", "--diff", "--group", "g1", "--idle-exit", "3")
        collected = [json.loads(x) for x in got.stdout.splitlines()]
        assert [e["diff"] for e in the_change(collected, "/doc.txt", DOC1, DOC2)] == [e["diff"] for e in doc]
        assert [e["diff"] for e in the_change(collected, "/etc/conf", CONF1, CONF2)] == [e["diff"] for e in conf]
        assert [e["diff_skipped"] for e in the_change(collected, "/blob.bin", bin1, bin2)] == ["binary"] * len(binary)
        bare = mirrorfs("collect", "--redis", redis.url, "--json", "--group", "g2", "--idle-exit", "3").stdout
        bare_events = [json.loads(x) for x in bare.splitlines()]
        assert len(bare_events) == len(collected)
        assert not any("diff" in e or "diff_skipped" in e for e in bare_events)
        shown = mirrorfs("collect", "--redis", redis.url, "--diff", "--group", "g3", "--idle-exit", "3").stdout
        assert "\n    +port = 2222\n" in shown and "\x1b" not in shown

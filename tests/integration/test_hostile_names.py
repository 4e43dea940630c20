"""Hostile directory entries (`../PWNED`, `SLASH/XX`, NUL, extra `.`/`..`, empty) in real ext4 images made with
debugfs and raw dirent edits (tests/hostile.py): already in the base or index, and arriving live as write records.

The engine must leave them out of the shadow tree, the view snapshot and the stream, report each once as an error
event naming the directory (path, inode), the entry's inode and the raw name in hex, and keep everything honest:
a file written in the same step, and legal names with control characters or non-UTF-8 bytes.
"""

from __future__ import annotations

import shutil
import time
import tracemalloc
from pathlib import Path

import pytest

from inference.engine import Engine, build_index
from inference.events import Mutation, fs_path, path_bytes
from inference.view import EngineView
from mirrorfs.stream.render import format_event
from tap.writelog import KIND_WRITE, Record
from tests import hostile as H
from tests.support import require_tools

pytestmark = pytest.mark.integration

MAX_SECONDS = 20          # engine time for one image's worth of hostile entries (measured: well under 1 s)
MAX_PEAK = 64 << 20       # tracemalloc peak while the engine takes them


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path, list[tuple[int, bytes]]]:
    """(clean image, the same with the hostile entries, the block changes between them)."""
    require_tools("mke2fs", "debugfs")
    clean = H.make_image(tmp_path / "clean.img")
    changes = H.hostile_name_changes(clean, tmp_path / "craft")
    bad = tmp_path / "hostile.img"
    shutil.copyfile(clean, bad)
    H.apply_changes(bad, changes)
    return clean, bad, changes


def _records(changes: list[tuple[int, bytes]], seq0: int, t0: int) -> list[Record]:
    return [Record(seq0 + k, t0 + k * 1000, KIND_WRITE, off, len(data), data) for k, (off, data) in
            enumerate(changes)]


def _bad_component(path: str | None) -> bool:
    if path is None:
        return False
    parts = path_bytes(path).split(b"/")
    return not path.startswith("/") or any(p in (b".", b"..") or b"\0" in p for p in parts) or \
        any(p == b"" for p in parts[1:-1]) or (path != "/" and parts[-1] == b"")


def _dir_ino(engine: Engine, path: str) -> int:
    tree = next(iter(engine.filesystems.values())).handler.tree
    return next(i for i in tree.nodes if tree.path(i) == path_bytes(path))


def _check_stream(engine: Engine, events: list[Mutation], bad_inos: set[int]) -> None:
    """No event path has a bad component or names a refused entry; each bad name is one error event."""
    for e in events:
        for p in (e.path, e.old_path, e.target if e.kind == "link" else None):
            assert not _bad_component(p), e
        assert H.HIDDEN_CHILD not in e.path, e
        if e.kind != "error":
            assert e.ino not in bad_inos, e
    errors = [e for e in events if e.kind == "error" and "name_hex" in e.extra]
    for dir_path, name in H.BAD_NAMES:
        hits = [e for e in errors if e.extra["name_hex"] == name.hex() and e.path == dir_path]
        assert len(hits) == 1, (dir_path, name, errors)
        e = hits[0]
        assert e.extra["dir_ino"] == e.ino == _dir_ino(engine, dir_path)
        assert e.extra["entry_ino"] in bad_inos
        assert f"directory inode {e.ino}" in e.message and f"entry inode {e.extra['entry_ino']}" in e.message
        assert f"'{name.hex()}'" in e.message
        assert e.to_json()  # serializes
    assert len(errors) == len(H.BAD_NAMES), errors


def _check_tree(engine: Engine) -> None:
    """The shadow tree and the view's snapshot hold the honest tree and the legal odd names, nothing else."""
    fs = next(iter(engine.filesystems))
    handler = engine.filesystems[fs].handler
    paths = {e.path for e in EngineView(engine).snapshot(fs)}
    assert {b"/d/keep.txt", b"/top.txt", H.HONEST_PATH.encode(), *H.ODD_PATHS} <= paths
    for p in paths:
        assert not _bad_component(fs_path(p)) and H.HIDDEN_CHILD.encode() not in p, p
    for d, children in handler.tree.children.items():
        for name in children:
            assert name not in H.BAD_COMPONENTS and b"/" not in name and b"\0" not in name, (d, name)
    from mirrorfs.view.tree import ViewTree

    view = ViewTree([fs])
    assert view.load(fs, EngineView(engine).snapshot(fs)) == len(paths) - 1  # every name, none refused


def _bad_inos(engine: Engine, image: Path) -> set[int]:
    """Inodes of the refused entries, from the image itself (debugfs)."""
    import subprocess

    out: set[int] = set()
    for dir_path in {d for d, _ in H.BAD_NAMES}:
        listing = subprocess.run(["debugfs", "-R", f"ls -l {dir_path}", str(image)], capture_output=True,
                                 check=True).stdout
        for line in listing.splitlines()[2:]:
            fields = line.split()
            if fields and fields[0].isdigit():
                out.add(int(fields[0]))
    tree = next(iter(engine.filesystems.values())).handler.tree
    return {i for i in out if tree.path(i) is None}


def test_hostile_names_in_the_base_image(images, tmp_path):
    """The base holds them: the engine starts, the tree is honest, the errors come with the first events."""
    _, bad, _ = images
    tracemalloc.start()
    start = time.monotonic()
    engine = Engine(tmp_path / "engine", bad.stat().st_size, base=bad)
    events = engine.tick(time.time_ns())
    elapsed = time.monotonic() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < MAX_SECONDS and peak < MAX_PEAK, (elapsed, peak)
    assert all(e.kind == "error" and e.seq == 0 for e in events), events
    bad_inos = _bad_inos(engine, bad)
    assert len(bad_inos) == len(H.BAD_NAMES)
    _check_tree(engine)
    _check_stream(engine, events, bad_inos)
    assert engine.tick(time.time_ns()) == [] and engine.finish() == []  # reported once
    engine.close()


def test_hostile_names_in_an_index(images, tmp_path):
    """Through `mirrorfs index`: the index keeps the errors, and every run loading it reports them with its
    first events (stamped with the first record, so seqs stay in order); the honest write of that record too."""
    clean, bad, _ = images
    index = tmp_path / "hostile.mfsidx"
    build_index(bad, index)
    later = H.debugfs_changes(bad, tmp_path / "later", ["mkdir later"])
    for run in range(2):
        engine = Engine(tmp_path / f"engine{run}", bad.stat().st_size, index=index)
        t0 = time.time_ns()
        events = engine.process(_records(later, 5, t0))
        events += engine.tick(t0 + 10**9) + engine.finish()
        errors = [e for e in events if e.kind == "error"]
        assert errors and all(e.seq == 5 for e in errors), errors
        assert events.index(errors[-1]) < len(errors), "the index's errors come first"
        assert any(e.kind == "mkdir" and e.path == "/later" for e in events), events
        _check_tree(engine)
        _check_stream(engine, events, _bad_inos(engine, bad))
        engine.close()


def test_hostile_names_arriving_live(images, tmp_path):
    """The same entries written while the engine runs (the blocks debugfs and the dirent edits changed, as the
    tap logs them): creates for the honest and the odd names, one error per bad name, none for the rest."""
    clean, bad, changes = images
    engine = Engine(tmp_path / "engine", clean.stat().st_size, base=clean)
    assert engine.tick(time.time_ns()) == []  # a clean base: nothing to report
    t0 = time.time_ns()
    tracemalloc.start()
    start = time.monotonic()
    events = engine.process(_records(changes, 1, t0))
    events += engine.tick(t0 + 10**9) + engine.tick(t0 + 2 * 10**9)
    elapsed = time.monotonic() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < MAX_SECONDS and peak < MAX_PEAK, (elapsed, peak)
    bad_inos = _bad_inos(engine, bad)
    _check_stream(engine, events, bad_inos)
    creates = {e.path for e in events if e.kind == "create"}
    assert H.HONEST_PATH in creates, events
    assert {fs_path(p) for p in H.ODD_PATHS} <= creates
    honest = next(e for e in events if e.kind == "modify" and e.path == H.HONEST_PATH)
    assert honest.ranges == [(0, len(H.HONEST_CONTENT))]
    _check_tree(engine)
    # Text output of the odd names: escaped, no raw control byte reaches a terminal.
    for e in events:
        line = format_event(e, as_json=False)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), repr(line)
        assert Mutation.from_json(format_event(e, as_json=True)).path == e.path  # JSON: lossless
    shown = "\n".join(format_event(e, as_json=False) for e in events)
    assert "/ctl\\nname" in shown and "/\\033[31mred" in shown and "/d/nonutf8\\377" in shown
    # Later writes re-read the same directories: the bad names that stay are not reported again.
    more = H.debugfs_changes(bad, tmp_path / "more", ["write /dev/null later.txt", "cd /d", "mkdir sub"])
    t1 = t0 + 3 * 10**9
    again = engine.process(_records(more, 100, t1)) + engine.tick(t1 + 10**9) + engine.finish()
    assert not [e for e in again if e.kind == "error"], again
    assert {"/later.txt", "/d/sub"} <= {e.path for e in again}
    engine.close()


def test_a_bad_name_removed_and_back_is_reported_again(images, tmp_path):
    """'Once while it stays there': after the entry leaves its directory, its return is a new error."""
    clean, bad, changes = images
    engine = Engine(tmp_path / "engine", clean.stat().st_size, base=bad)
    t0 = time.time_ns()
    first = engine.tick(t0)
    assert len([e for e in first if e.kind == "error"]) == len(H.BAD_NAMES)
    # the guest deletes it all (every changed block as it was before), then makes the same entries again
    gone = [(off, _clean_block(clean, off)) for off, _ in changes]
    events = engine.process(_records(gone, 1, t0)) + engine.tick(t0 + 10**9)
    assert not [e for e in events if e.kind == "error"], events
    events += engine.process(_records(changes, 100, t0 + 2 * 10**9)) + engine.tick(t0 + 3 * 10**9)
    events += engine.finish()
    back = [e for e in events if e.kind == "error" and "name_hex" in e.extra]
    assert {(e.path, e.extra["name_hex"]) for e in back} == {(d, n.hex()) for d, n in H.BAD_NAMES}, back
    engine.close()


def _clean_block(image: Path, off: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(off)
        return f.read(4096)


def test_cli_text_output_escapes_guest_names(images, tmp_path):
    """Through the real CLI: `mirrorfs replay` of the hostile writes, then `mirrorfs events` as text and as JSON.
    The terminal gets no raw control byte (stdout or stderr); JSON keeps the names."""
    import json

    from tap.state import StateDir
    from tap.writelog import WriteLog
    from tests.tapharness import mirrorfs

    clean, _, changes = images
    state = tmp_path / "state"
    StateDir(state).path.mkdir(parents=True)
    StateDir(state).init_state(clean.stat().st_size, "drive0")
    with WriteLog(StateDir(state).log) as log:
        for off, data in changes:
            log.append(KIND_WRITE, off, len(data), data)
    replay = mirrorfs("replay", "--state", state, "--base", clean, timeout=120)
    text = mirrorfs("events", "--state", state, timeout=60)
    for out in (text.stdout, text.stderr, replay.stderr):
        assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) <= 0x9F for c in out), repr(out)
    assert "/ctl\\nname" in text.stdout and "/\\033[31mred" in text.stdout and "/d/nonutf8\\377" in text.stdout
    assert text.stdout.count("bad name left out") == len(H.BAD_NAMES)
    as_json = mirrorfs("events", "--state", state, "--json", timeout=60)
    paths = {json.loads(line)["path"] for line in as_json.stdout.splitlines()}
    assert {fs_path(p) for p in H.ODD_PATHS} | {H.HONEST_PATH} <= paths
    assert not any(_bad_component(p) for p in paths)

"""The fidelity harness on its own: replay of synthetic events on synthetic trees, the tree diff, the
false-negative/false-positive rules, and workloads checked against a real (non-mounted) directory."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from inference.events import ErrorEvent, Mutation
from tests.fidelity.check import check_false_negatives, check_false_positives, check_model, entry_mtime_dirs
from tests.fidelity.replay import apply_events
from tests.fidelity.tree import Entry, Tree, diff_trees, snapshot_tree
from tests.fidelity.workload import (
    SHELL_COMMANDS,
    Op,
    fixed_workload,
    make_known_base,
    model_after,
    to_shell,
    workloads,
)
from tests.support import require


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def f(ino: int, data: bytes, mode: int = 0o644, mtime: int = 1) -> Entry:
    return Entry("file", len(data), mode, 0, 0, mtime, ino, sha256=sha(data), data=data)


def d(ino: int, mtime: int = 1) -> Entry:
    return Entry("dir", 4096, 0o755, 0, 0, mtime, ino)


def base() -> Tree:
    return {"/": d(2), "/a": d(10), "/a/x": f(11, b"hello world"), "/a/y": f(12, b"0123456789"),
            "/b": d(13), "/h1": f(14, b"linked"), "/h2": f(14, b"linked")}


def ev(seq: int, kind: str, path: str, **kw) -> Mutation:
    return (ErrorEvent if kind == "error" else Mutation)(seq=seq, time=0.0, kind=kind, path=path, **kw)


def attrs(ino: int, type_: str = "file", size: int = 0, mode: int = 0o644, mtime: int = 5) -> dict:
    return {"ino": ino, "type": type_, "size": size, "mode": mode, "uid": 0, "gid": 0, "mtime_ns": mtime}


def final_of(tree: Tree):
    by_ino = {e.ino: e.data for e in tree.values() if e.type == "file"}
    return lambda path, ino: by_ino.get(ino)


def test_replay_of_a_full_stream_equals_the_final_tree() -> None:
    t0 = base()
    final: Tree = {
        "/": d(2, 5), "/b": d(13, 5), "/b/a2": d(10, 5), "/b/a2/x": f(11, b"hello WORLD", mtime=5),
        "/b/a2/y": f(12, b"01234", mtime=5), "/new": f(20, b"fresh", 0o600, 5), "/h1": f(14, b"linked"),
        "/b/h3": f(14, b"linked"), "/s": Entry("symlink", 3, 0o777, 0, 0, 5, 21, target="b/x"),
        "/b/dir": d(22, 5),
    }
    final["/b/a2"].xattrs = {"user.k": "0102"}
    events = [
        ev(1, "create", "/new", **attrs(20, size=5, mode=0o600)),
        ev(2, "modify", "/a/x", ranges=[(6, 11)], **attrs(11, size=11)),
        ev(3, "truncate", "/a/y", **attrs(12, size=5)),
        ev(4, "rename", "/b/a2", old_path="/a", **attrs(10, "dir", 4096, 0o755)),
        ev(5, "delete", "/h2", **attrs(14, size=6, mtime=1)),
        ev(6, "link", "/b/h3", target="/h1", **attrs(14, size=6, mtime=1)),
        ev(7, "symlink", "/s", target="b/x", **attrs(21, "symlink", 3, 0o777)),
        ev(8, "mkdir", "/b/dir", **attrs(22, "dir", 4096, 0o755)),
        ev(9, "xattr", "/b/a2", xattr={"user.k": "0102"}, **attrs(10, "dir", 4096, 0o755)),
        ev(10, "attrib", "/", **attrs(2, "dir", 4096, 0o755)),
        ev(11, "attrib", "/b", **attrs(13, "dir", 4096, 0o755)),
    ]
    out = apply_events(t0, events, final_of(final))
    assert out.failures == []
    assert diff_trees(out, final, ino=True) == []
    assert t0["/a/x"].sha256 == sha(b"hello world"), "the tree at T is left alone"


def test_missed_modify_shows_as_a_hash_difference() -> None:
    final = base() | {"/a/x": f(11, b"hello WORLD")}
    out = apply_events(base(), [], final_of(final))
    assert out.failures == []
    assert diff_trees(out, final) == [f"'/a/x': sha256 replayed={sha(b'hello world')!r} "
                                      f"snapshot={sha(b'hello WORLD')!r}"]


def test_spurious_modify_and_bad_ranges_are_failures() -> None:
    events = [ev(1, "modify", "/a/x", ranges=[(0, 5)], **attrs(11, size=11)),
              ev(2, "modify", "/a/y", ranges=[(5, 99)], **attrs(12, size=10))]
    out = apply_events(base(), events, final_of(base()))
    assert any("outside the file" in x for x in out.failures)
    assert any("'/a/x' ranges [(0, 5)] but those bytes equal T's" in x for x in out.failures)


@pytest.mark.parametrize(("event", "why"), [
    (ev(1, "create", "/a/x", **attrs(30)), "exists"),
    (ev(1, "create", "/nope/x", **attrs(30)), "parent is not a directory"),
    (ev(1, "delete", "/missing", **attrs(30)), "missing"),
    (ev(1, "delete", "/a", **attrs(10, "dir")), "is dir"),
    (ev(1, "rmdir", "/a", **attrs(10, "dir")), "holds 2 entries"),
    (ev(1, "rename", "/c", old_path="/missing", **attrs(30)), "source is missing"),
    (ev(1, "rename", "/b", old_path="/a/x", **attrs(11)), "over '/b' (dir)"),
    (ev(1, "modify", "/a", ranges=[(0, 1)], **attrs(10, "dir")), "of a dir"),
    (ev(1, "attrib", "/a/x", **attrs(99)), "names ino 99"),
    (ev(1, "error", "/", message="bad checksum"), "bad checksum"),
    (ev(1, "create", "/c", ino=30, type="file"), "lacks"),
])
def test_events_that_cannot_apply_are_failures(event: Mutation, why: str) -> None:
    out = apply_events(base(), [event], final_of(base()))
    assert any(why in x for x in out.failures), out.failures


def test_attributes_follow_the_inode_across_hard_links() -> None:
    out = apply_events(base(), [ev(1, "attrib", "/h1", **attrs(14, size=6, mode=0o600))], final_of(base()))
    assert out["/h2"].mode == 0o600 and out.failures == []


def test_truncate_alone_derives_content_from_t() -> None:
    out = apply_events(base(), [ev(1, "truncate", "/a/y", **attrs(12, size=12))], lambda p, i: None)
    assert out.failures == [] and out["/a/y"].sha256 == sha(b"0123456789\0\0")


def test_diff_reports_link_groups_and_inos() -> None:
    a, b = base(), base()
    b["/h2"] = f(15, b"linked")
    diffs = diff_trees(a, b)
    assert any("hard-link group" in x for x in diffs) and not any(": ino " in x for x in diffs)
    assert any(": ino " in x for x in diff_trees(a, b, ino=True))


def test_snapshot_tree_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "ü f").write_bytes(b"abc")
    os.link(tmp_path / "dir" / "ü f", tmp_path / "hard")
    (tmp_path / "sym").symlink_to("dir/nowhere")
    os.setxattr(tmp_path / "dir", "user.t", b"\x01")
    tree = snapshot_tree(tmp_path)
    assert sorted(tree) == ["/", "/dir", "/dir/ü f", "/hard", "/sym"]
    assert tree["/dir/ü f"].sha256 == sha(b"abc") and tree["/dir/ü f"].ino == tree["/hard"].ino
    assert tree["/sym"].target == "dir/nowhere" and tree["/dir"].xattrs == {"user.t": "01"}


# ---------------------------------------------------------------- the ops/events rules

OPS = [Op("mkdir", "/fid"), Op("sync"), Op("write", "/fid/a", size=10, token="t1"), Op("sync"),
       Op("rename", "/fid/a", dest="/fid/b"), Op("chmod", "/fid/b", mode=0o600), Op("sync"),
       Op("write", "/fid/tmp", size=5, token="t2"), Op("unlink", "/fid/tmp"), Op("unlink", "/fid/b"), Op("sync")]
GOOD = [ev(1, "mkdir", "/fid"), ev(2, "attrib", "/"), ev(3, "create", "/fid/a"), ev(4, "modify", "/fid/a"),
        ev(5, "rename", "/fid/b", old_path="/fid/a"), ev(6, "attrib", "/fid/b"), ev(7, "delete", "/fid/b")]


def test_rules_accept_a_faithful_stream() -> None:
    assert check_false_negatives(OPS, GOOD) == []
    assert check_false_positives(OPS, GOOD) == []
    # the file created and deleted between two syncs may also be seen
    seen = [*GOOD[:6], ev(7, "create", "/fid/tmp"), ev(8, "delete", "/fid/tmp"), GOOD[6]]
    assert check_false_negatives(OPS, seen) == [] and check_false_positives(OPS, seen) == []


def test_rules_catch_missing_reordered_and_invented_events() -> None:
    missing = [e for e in GOOD if e.kind != "attrib" or e.path != "/fid/b"]
    assert ["interval 2 (ops 4..6): '/fid/b' mode/owner 0o600 0:0: no event"] == check_false_negatives(OPS, missing)
    swapped = [GOOD[0], GOOD[1], GOOD[4], GOOD[5], GOOD[2], GOOD[3], GOOD[6]]
    assert any("before earlier intervals" in x for x in check_false_negatives(OPS, swapped))
    invented = [*GOOD, ev(8, "attrib", "/README"), ev(9, "modify", "/fid")]
    assert len(check_false_positives(OPS, invented)) == 2


def test_a_delete_may_be_named_under_its_directory_renamed_in_the_same_interval() -> None:
    """rm d/s/f; mv d e between two syncs: the disk cannot tell that from mv d e; rm e/s/f."""
    ops = [Op("mkdir", "/fid"), Op("mkdir", "/fid/d"), Op("mkdir", "/fid/d/s"),
           Op("write", "/fid/d/s/f", size=3, token="t1"), Op("sync"),
           Op("unlink", "/fid/d/s/f"), Op("rename", "/fid/d", dest="/fid/e"), Op("sync")]
    head = [ev(1, "mkdir", "/fid"), ev(1, "mkdir", "/fid/d"), ev(1, "mkdir", "/fid/d/s"),
            ev(1, "create", "/fid/d/s/f"), ev(1, "modify", "/fid/d/s/f")]
    later = [ev(2, "rename", "/fid/e", old_path="/fid/d"), ev(2, "delete", "/fid/e/s/f")]
    assert check_false_negatives(ops, head + later) == [] and check_false_positives(ops, head + later) == []
    # but only under a path its directory really had in that interval
    wrong = [later[0], ev(2, "delete", "/fid/x/s/f")]
    assert check_false_positives(ops, head + wrong) == ["event #6 seq 2: delete '/fid/x/s/f' matches no op"]


# ---------------------------------------------------------------- workloads against a real directory

@pytest.fixture(scope="module")
def busybox_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH with only busybox applets: the guest's userland, without booting it."""
    busybox = shutil.which("busybox")
    require(busybox is not None, "busybox not installed (busybox-static)")
    out = tmp_path_factory.mktemp("bb")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        (out / a).symlink_to(busybox)
    missing = [c for c in SHELL_COMMANDS if c not in applets and c not in ("cd", "umask", "set", ":")]
    assert missing == [], f"busybox lacks {missing}"
    return out


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "t"
    make_known_base(out)
    return out


def run_script(ops: list[Op], shell: str, base_tree: Path, bb: Path, tmp: Path, python: str | None) -> list[str]:
    root = tmp / "t"
    subprocess.run(["cp", "-a", str(base_tree), str(root)], check=True)
    env = {"MNT": str(root), "PATH": str(bb)} if shell == "busybox" else {**os.environ, "MNT": str(root)}
    sh = str(bb / "sh") if shell == "busybox" else "sh"
    proc = subprocess.run([sh, "-c", to_shell(ops, python)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    problems = check_model(model_after(ops), snapshot_tree(root))
    shutil.rmtree(root)
    return problems


@pytest.mark.parametrize("shell", ["busybox", "dash"])
def test_fixed_workload_does_what_the_model_says(shell: str, base_tree: Path, busybox_bin: Path,
                                                 tmp_path: Path) -> None:
    assert run_script(fixed_workload(), shell, base_tree, busybox_bin, tmp_path, sys.executable) == []


def test_guest_scripts_refuse_xattr_ops() -> None:
    with pytest.raises(ValueError, match="setfattr"):
        to_shell(fixed_workload(xattrs=True))
    assert "PY=" not in to_shell(fixed_workload(xattrs=False))


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=workloads())
def test_random_workloads_do_what_the_model_says(ops: list[Op], base_tree: Path, busybox_bin: Path,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    for shell in ("busybox", "dash"):
        assert run_script(ops, shell, base_tree, busybox_bin, tmp_path_factory.mktemp("w"), sys.executable) == []


def test_directories_whose_mtime_only_entries_set() -> None:
    dirs = entry_mtime_dirs(fixed_workload())
    assert {"/", "/fid", "/fid/a b", "/fid/big", "/links", "/small"} <= dirs
    assert "/fid/a b/dir moved" not in dirs, "utime after its last entry change: its mtime must replay exactly"

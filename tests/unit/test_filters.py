"""Filters mean the same at every layer: globs, fields, the JSON form, and the bounds on hostile filters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.events import Mutation
from mirrorfs.stream.filters import MAX_FILTER_BYTES, Filter, FilterError, under, union_prefixes


@pytest.mark.parametrize("glob,path,ok", [
    ("/etc/**", "/etc/passwd", True), ("/etc/**", "/etc/ssh/sshd_config", True), ("/etc/**", "/etc", False),
    ("/etc/**", "/etcx/a", False), ("/etc/*", "/etc/ssh/x", False), ("/etc/*", "/etc/hosts", True),
    ("/**/passwd", "/passwd", True), ("/**/passwd", "/a/b/passwd", True), ("/**/passwd", "/a/passwdx", False),
    ("/var/log/*.log", "/var/log/syslog.log", True), ("/var/log/*.log", "/var/log/a/b.log", False),
    ("/f?", "/f1", True), ("/f?", "/f12", False), ("/f[0-9]", "/f7", True), ("/f[!0-9]", "/f7", False),
    ("/**", "/anything/at/all", True), ("/a.b", "/aXb", False), ("/a/**/z", "/a/z", True),
    ("/a/**/z", "/a/b/c/z", True),
])
def test_globs(glob, path, ok):
    assert Filter.make(paths=[glob]).match_path(path) is ok


def test_rename_matches_old_or_new_path():
    f = Filter.make(paths=["/etc/**"])
    assert f.matches(Mutation(seq=1, time=0, kind="rename", path="/tmp/x", old_path="/etc/x"))
    assert f.matches({"kind": "rename", "path": "/etc/x", "old_path": "/tmp/x"})
    assert not f.matches({"kind": "rename", "path": "/tmp/y", "old_path": "/tmp/x"})


def test_fields_all_hold():
    f = Filter.make(paths=["/etc/**"], kinds=["modify", "create"], vm=["vm1"])
    assert f.matches({"kind": "modify", "path": "/etc/a", "vm": "vm1"})
    assert not f.matches({"kind": "delete", "path": "/etc/a", "vm": "vm1"})
    assert not f.matches({"kind": "modify", "path": "/etc/a", "vm": "vm2"})
    assert Filter().matches({"kind": "anything"}) and Filter().is_all


def test_json_round_trip_is_compact():
    f = Filter.make(paths=["/etc/**"], kinds=["create"])
    assert f.to_json() == '{"paths":["/etc/**"],"kinds":["create"]}'
    assert Filter.from_json(f.to_json()) == f


@pytest.mark.parametrize("obj,msg", [
    ([1], "JSON object"), ({"paths": "etc"}, "absolute"), ({"paths": [1]}, "list of strings"),
    ({"kinds": ["explode"]}, "unknown kind"), ({"colour": []}, "unknown filter field"),
    ({"paths": ["/a**"]}, "whole path component"), ({"paths": ["/[a"]}, "unclosed"),
    ({"paths": ["/" + "*/" * 20]}, "more than"), ({"paths": [f"/p{i}" for i in range(65)]}, "at most 64"),
    ({"paths": ["/" + "x" * (MAX_FILTER_BYTES + 1)]}, "too large"),
])
def test_bad_filters_are_refused_with_a_reason(obj, msg):
    with pytest.raises(FilterError, match=msg):
        Filter.from_obj(obj)


def test_not_json():
    with pytest.raises(FilterError, match="not JSON"):
        Filter.from_json("{paths")
    with pytest.raises(FilterError, match="too large"):
        Filter.from_json("x" * (MAX_FILTER_BYTES + 1))


def test_prefixes_for_layered_filtering():
    assert Filter.make(paths=["/etc/**", "/var/log/*.log"]).prefixes() == ("/etc", "/var/log")
    assert Filter.make(paths=["/**/passwd"]).prefixes() is None
    assert union_prefixes([Filter.make(paths=["/etc/**"]), Filter.make(paths=["/root/**"])]) == ("/etc", "/root")
    assert union_prefixes([Filter.make(paths=["/etc/**"]), Filter()]) is None
    assert under("/etc/a", ("/etc",)) and not under("/etcx", ("/etc",)) and under("/x", ("",))


names = st.text(alphabet="abc.-_", min_size=1, max_size=5)


@given(st.lists(names, min_size=1, max_size=5), st.lists(names, min_size=0, max_size=4))
def test_double_star_is_any_depth_below(prefix, rest):
    base = "/" + "/".join(prefix)
    f = Filter.make(paths=[base + "/**"])
    assert f.match_path(base + "".join("/" + r for r in rest)) is bool(rest)
    assert not f.match_path(base + "x/" + "y")


def test_hostile_glob_is_fast():
    import time
    f = Filter.make(paths=["/" + "*a" * 16 + "b"])
    t = time.monotonic()
    assert not f.match_path("/" + "a" * 4000)
    assert time.monotonic() - t < 1.0

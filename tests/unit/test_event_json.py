"""Mutation.to_json writes with orjson where it can (speed, issue 12) and must give exactly the bytes the json module
gives (json.dumps(ensure_ascii=False, separators=(",", ":")), then the terminal escapes; the ASCII form where a name
is not UTF-8) for any event a hostile guest can cause: any name bytes, any float and int a field can hold."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.events import _TERMINAL_ACTIVE, Mutation, fs_path


def _reference(m: Mutation) -> str:
    text = json.dumps(m.to_dict(), ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(m.to_dict(), separators=(",", ":"))
    return _TERMINAL_ACTIVE.sub(lambda c: f"\\u{ord(c.group()):04x}", text)


_ints = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.sampled_from([0, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64,
                                                                      -(2 ** 63), -(2 ** 63) - 1]))
_floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2 ** 65), 2 ** 65).map(
    lambda ns: ns / 1e9), st.sampled_from([1e-5, 1e-4, 9.999e-5, 1e16, 9.999999999999998e15, 0.0, -0.0]))


@settings(max_examples=500, deadline=None)
@given(name=st.binary(max_size=40), text=st.text(max_size=20), t=_floats, mtime=st.none() | _floats, size=_ints,
       ns=_ints, extra=st.booleans())
def test_to_json_is_the_json_modules_text(name, text, t, mtime, size, ns, extra) -> None:
    m = Mutation(seq=7, time=t, kind="modify", path="/" + fs_path(name), size=size, mtime=mtime, mtime_ns=ns,
                 target=text, ranges=[(0, size)], parent={"ino": 2, "size": size, "mtime_ns": ns},
                 xattr={"user." + text: name.hex(), "user.x": None}, extra={"note": t} if extra else {})
    assert m.to_json() == _reference(m)
    assert Mutation.from_json(m.to_json()).to_json() == m.to_json()


def test_an_ordinary_event_takes_the_orjson_path() -> None:
    from inference.events import _orjson_text

    m = Mutation(seq=7, time=1796205291.0356696, kind="create", path="/m/d39/f033", size=0, mtime=1796205291.012715,
                 mtime_ns=1796205291012714931, parent={"ino": 2977, "size": 4096})
    assert _orjson_text(m.to_dict()) == m.to_json() == _reference(m)

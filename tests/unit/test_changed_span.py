"""Engine.changed_span gallops and pins bytes with an int XOR: it must equal the byte-by-byte answer everywhere,
at window edges, for a change at either end, none, or zeros (a WRITE_ZEROES payload of None). nonzero_span (a
write over a hole) must equal changed_span against zeros."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.engine import SPAN_STEP, changed_span, nonzero_span


def _reference(old: bytes, new: bytes | None, length: int) -> tuple[int, int] | None:
    new = new if new is not None else bytes(length)
    diff = [i for i in range(length) if old[i] != new[i]]
    return (diff[0], diff[-1] + 1) if diff else None


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    n = draw(st.sampled_from([1, 2, 7, SPAN_STEP - 1, SPAN_STEP, SPAN_STEP + 1, 3 * SPAN_STEP + 5, 4096, 9000]))
    fill = draw(st.sampled_from([b"\0", b"\xff", b"ab"]))
    new = (fill * n)[:n]
    old = bytearray(new)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        old[i] ^= draw(st.integers(1, 255))
    return bytes(old), (None if fill == b"\0" and draw(st.booleans()) else new)


@settings(max_examples=400, deadline=None)
@given(_pairs())
def test_changed_span_is_exact(pair: tuple[bytes, bytes | None]) -> None:
    old, new = pair
    assert changed_span(old, new, len(old)) == _reference(old, new, len(old))


def test_changed_span_edges() -> None:
    base = bytes(8192)
    for i in (0, 1, SPAN_STEP - 1, SPAN_STEP, 4095, 4096, 8191):
        old = bytearray(base)
        old[i] = 1
        assert changed_span(bytes(old), base, len(base)) == (i, i + 1)
    assert changed_span(base, None, len(base)) is None


@settings(max_examples=400, deadline=None)
@given(_pairs())
def test_nonzero_span_is_changed_span_over_zeros(pair: tuple[bytes, bytes | None]) -> None:
    for data in pair:
        if data is not None:
            assert nonzero_span(data) == _reference(bytes(len(data)), data, len(data))


def test_nonzero_span_edges() -> None:
    assert nonzero_span(b"") is None
    assert nonzero_span(bytes(9000)) is None
    for i in (0, 1, SPAN_STEP - 1, SPAN_STEP, 4095, 4096, 8191):
        data = bytearray(8192)
        data[i] = 7
        assert nonzero_span(bytes(data)) == (i, i + 1)
        data[8191 - i] = 1
        assert nonzero_span(bytes(data)) == (min(i, 8191 - i), max(i, 8191 - i) + 1)

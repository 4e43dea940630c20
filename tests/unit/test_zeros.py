"""inference/zeros.py finds what strip(b"\\0") finds, at the ends of any buffer and window (and so nonzero_span)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.engine import changed_span, nonzero_span
from inference.zeros import data_end, data_start


@st.composite
def buffers(draw) -> bytes:
    """Runs of zeros and of data, of lengths around the gallop's window sizes (256, doubling; 64 KiB zeros)."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        n = draw(st.one_of(st.integers(0, 600), st.sampled_from([255, 256, 257, 511, 512, 4095, 4096, 65535,
                                                                 65536, 65537, 140_000])))
        if draw(st.booleans()):
            parts.append(bytes(n))
        else:
            parts.append(draw(st.binary(min_size=min(n, 1), max_size=min(n, 8))).ljust(n, b"\1"))
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(buffers(), st.data())
def test_ends_are_those_strip_finds(b: bytes, data) -> None:
    lo = data.draw(st.integers(0, len(b)))
    hi = data.draw(st.integers(lo, len(b)))
    w = b[lo:hi]
    assert data_start(b, lo, hi) == lo + len(w) - len(w.lstrip(b"\0"))
    assert data_end(b, lo, hi) == lo + len(w.rstrip(b"\0"))
    assert data_start(b) == len(b) - len(b.lstrip(b"\0"))
    assert data_end(b) == len(b.rstrip(b"\0"))


@settings(max_examples=200, deadline=None)
@given(buffers())
def test_nonzero_span_is_changed_span_from_zeros(b: bytes) -> None:
    assert nonzero_span(b) == changed_span(bytes(len(b)), b, len(b))


def test_edges() -> None:
    assert data_start(b"") == 0 and data_end(b"") == 0
    assert data_start(bytes(70_000)) == 70_000 and data_end(bytes(70_000)) == 0
    one = bytearray(200_000)
    for at in (0, 1, 255, 256, 65_535, 65_536, 131_072, 199_999):
        one[at] = 7
        assert data_start(bytes(one)) == at and data_end(bytes(one)) == at + 1
        one[at] = 0

"""Where the zero bytes at the ends of a buffer stop: the first and the last nonzero byte, found by memcmp.

`bytes.strip(b"\\0")` tests each byte against its argument (~2 ns a byte here): a file's last block with 2 KiB of
zero padding cost ~4 us, once per written file and once per data write of a replay. Windows that double in size
are compared with a buffer of zeros instead (memcmp, ~0.1 ns a byte); the window that holds the edge is halved
the same way until it is small, and only that is stripped.
"""

from __future__ import annotations

_ZEROS = bytes(1 << 16)
_SMALL = 256  # windows up to this size are stripped (cheaper than more compares)


def _is_zero(b: bytes, lo: int, hi: int) -> bool:
    n = hi - lo
    if n <= len(_ZEROS):
        return b[lo:hi] == _ZEROS[:n]
    return b.count(0, lo, hi) == n  # (a window past 64 KiB: counted in place, no copy)


def data_start(b: bytes, lo: int = 0, hi: int | None = None) -> int:
    """The index of the first nonzero byte of b[lo:hi] (hi if there is none): lo + what lstrip(b"\\0") strips."""
    hi = len(b) if hi is None else hi
    start, step = lo, _SMALL
    while True:  # gallop: [lo, start) is all zeros
        if start >= hi:
            return hi
        end = min(start + step, hi)
        if not _is_zero(b, start, end):
            break
        start, step = end, step * 2
    while end - start > _SMALL:  # [start, end) holds the first nonzero byte
        mid = (start + end) // 2
        if _is_zero(b, start, mid):
            start = mid
        else:
            end = mid
    window = b[start:end]
    return start + len(window) - len(window.lstrip(b"\0"))


def data_end(b: bytes, lo: int = 0, hi: int | None = None) -> int:
    """The index just past the last nonzero byte of b[lo:hi] (lo if there is none): lo + len(that.rstrip(b"\\0"))."""
    hi = len(b) if hi is None else hi
    end, step = hi, _SMALL
    while True:  # gallop: [end, hi) is all zeros
        if end <= lo:
            return lo
        start = max(end - step, lo)
        if not _is_zero(b, start, end):
            break
        end, step = start, step * 2
    while end - start > _SMALL:  # [start, end) holds the last nonzero byte
        mid = (start + end) // 2
        if _is_zero(b, mid, end):
            end = mid
        else:
            start = mid
    return start + len(b[start:end].rstrip(b"\0"))

"""Shared plumbing of the volume parsers: a bounded reader over guest bytes and what a table parser yields.

Every parser gets a `Reader` rather than the raw callable so that no guest-supplied offset or length can reach
outside the disk or ask for an unbounded allocation, and a failing read becomes an error string, not an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

SECTOR = 512
MAX_READ = 2 << 20  # the largest single read any parser needs (LVM text is capped at 1 MiB, GPT entries at 512 KiB)


class Reader:
    """Reads exactly `n` bytes at `off`: zero-padded past the disk end or on a short read, errors collected."""

    def __init__(self, read: Callable[[int, int], bytes], disk_size: int, errors: list[str]) -> None:
        self.read = read
        self.disk_size = disk_size
        self.errors = errors

    def __call__(self, off: int, n: int) -> bytes:
        if n <= 0 or off < 0 or n > MAX_READ or off >= self.disk_size:
            return bytes(max(0, min(n, MAX_READ)))
        m = min(n, self.disk_size - off)
        try:
            data = bytes(self.read(off, m))[:m]
        except (OSError, ValueError) as e:  # an I/O error on one table must not stop the others from parsing
            self.errors.append(f"read {off}+{m} failed: {e}")
            data = b""
        return data.ljust(n, b"\0")

    def fits(self, off: int, n: int) -> bool:
        return 0 <= off and 0 <= n and off + n <= self.disk_size


@dataclass(slots=True)
class RawPart:
    """A partition-table entry before content sniffing; `container` marks an MBR extended partition."""

    number: int
    start: int  # bytes, whole-disk
    size: int  # bytes
    label: str = ""
    uuid: str = ""
    container: bool = False


@dataclass(slots=True)
class TableScan:
    """What a table parser found: partitions, the byte ranges holding the table itself, and its name."""

    kind: str  # "dos", "gpt" or "" when there is no table
    parts: list[RawPart] = field(default_factory=list)
    regions: list[tuple[int, int]] = field(default_factory=list)  # (disk offset, length) of table metadata

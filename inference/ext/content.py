"""A regular file's bytes at the engine's last consistency point, by inode: the one read path of the view
(inference/view.py EngineView.read) and of the content hashes in events (inference/hashes.py)."""

from __future__ import annotations

MAX_READ = 32 << 20


def read_file(handler, ino: int, offset: int, size: int) -> bytes:
    """File content as the replica holds it at the point (holes and unwritten extents read as zeros, as the guest's
    kernel reads them). Shorter than asked where the engine's file ends: the caller decides what that means
    (the FUSE view answers EIO, never padding). Inline-data files (ext4 inline_data) read the bytes kept in
    the inode, from the committed metadata."""
    node = handler.tree.peek(ino)
    if node is None or node.type != "file" or offset >= node.size or size <= 0:
        return b""
    size = min(size, node.size - offset, MAX_READ)
    if not node.extents and handler.geo.inline_data and node.size <= handler.geo.block_size:
        inline = handler.inline_bytes(ino, node.size)
        if inline is not None:
            return inline[offset:offset + size]
    bs = handler.geo.block_size
    first, last = offset // bs, (offset + size - 1) // bs
    for logical, physical, length, uninit in node.extents:
        if logical <= first and last < logical + length and not uninit:  # one written extent: one pread
            return handler.read_data((physical + first - logical) * bs + offset % bs, size)
    out = bytearray(size)
    for logical, physical, length, uninit in node.extents:
        lo, hi = max(first, logical), min(last + 1, logical + length)
        if lo >= hi or uninit:
            continue
        data = handler.read_data((physical + lo - logical) * bs, (hi - lo) * bs)
        start = lo * bs - offset
        a, b = max(start, 0), min(start + len(data), size)
        if a < b:
            out[a:b] = data[a - start:b - start]
    return bytes(out)

"""tap.nbd against hostile input: nothing raises, every loop ends, memory stays bounded, closed stays closed."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tap import nbd
from tap.nbd import Export, NBDServer, ProtocolError, Read, Write
from tests.unit.test_nbd import Client

SIZE = 64 << 10
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

QEMU_HANDSHAKE = (struct.pack(">I", 3) + Client.option(nbd.OPT_STRUCTURED_REPLY)
                  + Client.option(nbd.OPT_GO, Client.go_data("disk0", (nbd.INFO_BLOCK_SIZE,))))
SAMPLE_REQUESTS = (Client.request(nbd.CMD_WRITE, 1, 0, payload=b"abcd" * 8)
                   + Client.request(nbd.CMD_WRITE, 2, SIZE - 4, payload=b"toolong!")
                   + Client.request(nbd.CMD_READ, 3, 0, 16) + Client.request(nbd.CMD_FLUSH, 4))


def new_server() -> NBDServer:
    server = NBDServer({"disk0": Export("disk0", SIZE), "ro": Export("ro", SIZE, read_only=True)})
    server.data_to_send()
    return server


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False)]


def pump(server: NBDServer, chunks: list[bytes]) -> tuple[list[nbd.Event], bytes]:
    """Drive the server like the transport; check the invariants after every chunk."""
    evs: list[nbd.Event] = []
    out = bytearray()
    fed = 0
    for chunk in chunks:
        was_closed = server.closed
        server.receive_data(chunk)
        fed += len(chunk)
        while (ev := server.next_event()) is not None:
            evs.append(ev)
            # Every event but ExportSelected and the final one consumes a whole 28-byte request.
            assert len(evs) <= fed // nbd.REQUEST_SIZE + 2
            assert not was_closed
            if isinstance(ev, ProtocolError):
                assert not ev.message.startswith("internal error"), ev.message
            elif isinstance(ev, Read):
                server.reply(ev.handle, data=bytes(ev.length))
            elif hasattr(ev, "handle"):
                server.reply(ev.handle)  # type: ignore[attr-defined]
        assert server.buffered <= nbd.MAX_BUFFERED
        if was_closed:
            assert server.closed and server.buffered == 0
        out += server.data_to_send()
    return evs, bytes(out)


# (a) random bytes, after the greeting or at any point of a valid conversation.

@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=12))
def test_random_bytes_after_greeting(junk: bytes, cuts: list[int]) -> None:
    pump(new_server(), split(junk, cuts))


@FUZZ
@given(st.integers(min_value=0, max_value=len(QEMU_HANDSHAKE + SAMPLE_REQUESTS)), st.binary(max_size=2000),
       st.lists(st.integers(min_value=0), max_size=12))
def test_random_bytes_at_any_point(keep: int, junk: bytes, cuts: list[int]) -> None:
    stream = (QEMU_HANDSHAKE + SAMPLE_REQUESTS)[:keep] + junk
    pump(new_server(), split(stream, cuts))


# (b) structurally valid-ish conversations with random codes, lengths, offsets and flags.

names = st.sampled_from([b"", b"disk0", b"ro", b"nope", b"\xff\xfe", b"x" * 5000])
infos = st.lists(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 0xFFFF)), max_size=6)


@st.composite
def go_like(draw: st.DrawFn) -> bytes:
    name, wanted = draw(names), draw(infos)
    data = struct.pack(">I", len(name)) + name + struct.pack(f">H{len(wanted)}H", len(wanted), *wanted)
    if draw(st.booleans()):  # corrupt a length field or truncate
        data = draw(st.sampled_from([data[:-1], data + b"\0", b"\xff\xff" + data[2:], data[:3]]))
    return data


options = st.tuples(
    st.one_of(st.integers(0, 12), st.sampled_from([99, 1 << 31, 0xFFFFFFFF])),
    st.one_of(st.binary(max_size=64), go_like()),
)


@FUZZ
@given(st.one_of(st.sampled_from([3, 1]), st.integers(0, 2**32 - 1)), st.lists(options, max_size=8),
       st.one_of(st.none(), st.integers(0, 8)), st.lists(st.integers(min_value=0), max_size=12))
def test_random_options(client_flags: int, opts: list[tuple[int, bytes]], go_at: int | None,
                        cuts: list[int]) -> None:
    if go_at is not None:  # a valid GO somewhere, so that some conversations reach transmission
        opts.insert(go_at, (nbd.OPT_GO, Client.go_data("disk0", (nbd.INFO_BLOCK_SIZE,))))
    stream = struct.pack(">I", client_flags) + b"".join(Client.option(o, d) for o, d in opts)
    stream += SAMPLE_REQUESTS
    pump(new_server(), split(stream, cuts))


offsets = st.one_of(st.integers(0, SIZE), st.sampled_from([SIZE - 1, SIZE, SIZE + 1, 2**64 - 1]),
                    st.integers(0, 2**64 - 1))
lengths = st.one_of(st.integers(0, 64), st.integers(1, 64), st.integers(0, 4096),
                    st.sampled_from([512, SIZE, nbd.MAX_PAYLOAD + 1, 2**32 - 1]),
                    st.integers(0, 2**32 - 1))
flags = st.one_of(st.just(0), st.sampled_from([nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_DF,
                                                nbd.CMD_FLAG_FAST_ZERO]), st.integers(0, 0xFFFF))
kinds = st.one_of(st.integers(0, 8), st.just(nbd.CMD_WRITE), st.integers(0, 0xFFFF))


@st.composite
def requests(draw: st.DrawFn, handle: int) -> tuple[bytes, bool]:
    """One request (WRITEs carry their whole payload), and whether it must end the connection."""
    kind, offset, flag = draw(kinds), draw(offsets), draw(flags)
    length = draw(lengths)
    if kind == nbd.CMD_WRITE and length <= nbd.MAX_PAYLOAD:
        length = min(length, 64)
        return Client.request(kind, handle, offset, flags=flag, payload=draw(st.binary(min_size=length,
                                                                                         max_size=length))), False
    fatal = kind == nbd.CMD_DISC or (kind in (nbd.CMD_WRITE, nbd.CMD_READ) and length > nbd.MAX_PAYLOAD)
    if draw(st.sampled_from([False] * 40 + [True])):  # now and then a bad magic
        return b"\x25\x60\x95\x00" + Client.request(kind, handle, offset, length, flag)[4:], True
    return Client.request(kind, handle, offset, length, flag), fatal


@settings(FUZZ, max_examples=150)
@given(st.data(), st.integers(0, 30), st.booleans(), st.lists(st.integers(min_value=0), max_size=16))
def test_random_requests(data: st.DataObject, count: int, read_only: bool, cuts: list[int]) -> None:
    reqs = [data.draw(requests(handle)) for handle in range(1, count + 1)]
    name = "ro" if read_only else "disk0"
    handshake = (struct.pack(">I", 3) + Client.option(nbd.OPT_STRUCTURED_REPLY)
                 + Client.option(nbd.OPT_GO, Client.go_data(name, (nbd.INFO_BLOCK_SIZE,))))
    server = new_server()
    stream = handshake + b"".join(r for r, _ in reqs)
    evs, out = pump(server, split(stream, cuts))

    # Every request before the first fatal one gets exactly one reply; nothing after it is looked at.
    expected = []
    for handle, (_, fatal) in enumerate(reqs, 1):
        if fatal:
            break
        expected.append(handle)
    reads = {ev.handle: ev.length for ev in evs if isinstance(ev, Read)}
    for ev in evs:
        if isinstance(ev, Write):
            assert ev.offset + len(ev.data) <= SIZE and len(ev.data) > 0 and not read_only
    ack = struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, nbd.OPT_GO, nbd.REP_ACK, 0)
    pos = out.index(ack) + len(ack)  # simple replies follow the GO's ACK
    replied = []
    while pos < len(out):
        magic, error, handle = struct.unpack_from(">IIQ", out, pos)
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        pos += 16 + (reads.get(handle, 0) if error == 0 else 0)
        replied.append(handle)
    assert pos == len(out)
    assert sorted(replied) == expected
    assert server.closed == (len(expected) < len(reqs))


# (c) the largest WRITEs, cut anywhere: the buffer never holds more than one request.

@settings(max_examples=10, deadline=None)
@given(st.integers(nbd.MAX_PAYLOAD - 4096, nbd.MAX_PAYLOAD), st.lists(st.integers(1, 3 << 20), min_size=1, max_size=40))
def test_largest_writes_stay_bounded(length: int, sizes: list[int]) -> None:
    server = NBDServer({"big": Export("big", 2 * nbd.MAX_PAYLOAD)})
    server.data_to_send()
    stream = bytearray(struct.pack(">I", 3) + Client.option(nbd.OPT_EXPORT_NAME, b"big"))
    for handle in (1, 2):
        stream += Client.request(nbd.CMD_WRITE, handle, 0, length) + bytes(length)
    stream += Client.request(nbd.CMD_FLUSH, 3)
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(bytes(stream[pos : pos + size]))
        pos += size
    chunks.append(bytes(stream[pos:]))
    evs, _ = pump(server, chunks)
    assert [(type(e).__name__, getattr(e, "handle", None)) for e in evs] == [
        ("ExportSelected", None), ("Write", 1), ("Write", 2), ("Flush", 3)]
    assert all(len(e.data) == length for e in evs if isinstance(e, Write))

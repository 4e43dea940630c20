"""tap.nbd: the sans-I/O NBD server, driven by a sans-I/O test client the way QEMU's mirror job drives it."""

from __future__ import annotations

import struct

import pytest

from tap import nbd
from tap.nbd import (
    Disconnect,
    Export,
    ExportSelected,
    Flush,
    NBDServer,
    ProtocolError,
    Read,
    Trim,
    Write,
    WriteZeroes,
)

SIZE = 1 << 20
RW_FLAGS = (nbd.FLAG_HAS_FLAGS | nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_FUA | nbd.FLAG_SEND_WRITE_ZEROES
            | nbd.FLAG_SEND_TRIM)


# --- a tiny sans-I/O client (test helper) ----------------------------------------------------------------

class Client:
    """Builds what an NBD client sends and parses what the server answered."""

    def __init__(self) -> None:
        self.buf = bytearray()

    # client → server
    @staticmethod
    def option(opt: int, data: bytes = b"") -> bytes:
        return struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data

    @staticmethod
    def go_data(name: str | bytes, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode() if isinstance(name, str) else name
        return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)

    @staticmethod
    def request(kind: int, handle: int, offset: int = 0, length: int | None = None, flags: int = 0,
                payload: bytes = b"") -> bytes:
        n = len(payload) if length is None else length
        return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, kind, handle, offset, n) + payload

    # server → client
    def feed(self, data: bytes | bytearray) -> None:
        self.buf += data

    def _take(self, n: int) -> bytes:
        assert len(self.buf) >= n, f"server sent {len(self.buf)} bytes, expected at least {n}"
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self._take(18))
        assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        return flags

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self._take(20))
        assert magic == nbd.OPTION_REPLY_MAGIC
        return opt, rep, self._take(length)

    def option_replies(self) -> list[tuple[int, int, bytes]]:
        """Replies up to and including the final one (ACK or an error)."""
        out = [self.option_reply()]
        while out[-1][1] in (nbd.REP_SERVER, nbd.REP_INFO):
            out.append(self.option_reply())
        return out

    def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, handle = struct.unpack(">IIQ", self._take(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        return error, handle, self._take(read_length) if error == 0 else b""


def events(server: NBDServer, data: bytes = b"") -> list[nbd.Event]:
    server.receive_data(data)
    out = []
    while (ev := server.next_event()) is not None:
        out.append(ev)
    return out


def handshake(server: NBDServer, client: Client, name: str = "disk0", client_flags: int = 3) -> ExportSelected:
    """QEMU's handshake: flags 3, STRUCTURED_REPLY (refused), GO asking for the block size."""
    client.feed(server.data_to_send())
    assert client.greeting() == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
    evs = events(server, struct.pack(">I", client_flags) + client.option(nbd.OPT_STRUCTURED_REPLY)
                 + client.option(nbd.OPT_GO, client.go_data(name, (nbd.INFO_BLOCK_SIZE,))))
    client.feed(server.data_to_send())
    assert client.option_reply() == (nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_UNSUP, b"")
    assert len(evs) == 1 and isinstance(evs[0], ExportSelected)
    return evs[0]


def rw_server(size: int = SIZE, read_only: bool = False) -> tuple[NBDServer, Client]:
    server = NBDServer({"disk0": Export("disk0", size, read_only=read_only)})
    client = Client()
    handshake(server, client)
    client.option_replies()
    return server, client


# --- handshake -------------------------------------------------------------------------------------------

def test_qemu_handshake() -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    client = Client()
    selected = handshake(server, client)
    assert selected.export == server.export == Export("disk0", SIZE)
    replies = client.option_replies()
    assert [r[:2] for r in replies] == [(nbd.OPT_GO, nbd.REP_INFO)] * 2 + [(nbd.OPT_GO, nbd.REP_ACK)]
    infos = {struct.unpack(">H", data[:2])[0]: data for _, _, data in replies[:-1]}
    assert infos[nbd.INFO_EXPORT] == struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, RW_FLAGS)
    assert infos[nbd.INFO_BLOCK_SIZE] == struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, 1, 4096, 32 << 20)
    assert not client.buf and not server.closed


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name(no_zeroes: bool) -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    flags = nbd.FLAG_C_FIXED_NEWSTYLE | (nbd.FLAG_C_NO_ZEROES if no_zeroes else 0)
    evs = events(server, struct.pack(">I", flags) + client.option(nbd.OPT_EXPORT_NAME, b"disk0"))
    assert evs == [ExportSelected(Export("disk0", SIZE))]
    out = bytes(server.data_to_send())
    assert out == struct.pack(">QH", SIZE, RW_FLAGS) + (b"" if no_zeroes else bytes(124))


def test_export_name_unknown_closes() -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    server.data_to_send()
    evs = events(server, struct.pack(">I", 1) + Client.option(nbd.OPT_EXPORT_NAME, b"nope"))
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError) and server.closed
    assert server.data_to_send() == b""


def test_default_export_needs_exactly_one() -> None:
    one = NBDServer({"disk0": Export("disk0", SIZE)})
    one.data_to_send()
    assert events(one, struct.pack(">I", 3) + Client.option(nbd.OPT_EXPORT_NAME)) == [
        ExportSelected(Export("disk0", SIZE))]
    two = NBDServer({"a": Export("a", 1), "b": Export("b", 2)})
    client = Client()
    client.feed(two.data_to_send())
    client.greeting()
    assert events(two, struct.pack(">I", 3) + client.option(nbd.OPT_GO, client.go_data(""))) == []
    client.feed(two.data_to_send())
    assert client.option_replies()[-1][:2] == (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN)


def test_info_then_go() -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE, description="the guest disk")})
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    wanted = (nbd.INFO_NAME, nbd.INFO_DESCRIPTION, 77)  # 77: unknown, ignored
    assert events(server, struct.pack(">I", 3) + client.option(nbd.OPT_INFO, client.go_data("disk0", wanted))) == []
    client.feed(server.data_to_send())
    replies = client.option_replies()
    assert replies[-1] == (nbd.OPT_INFO, nbd.REP_ACK, b"")
    infos = sorted(data for _, rep, data in replies if rep == nbd.REP_INFO)
    assert infos == sorted([struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, RW_FLAGS),
                            struct.pack(">H", nbd.INFO_NAME) + b"disk0",
                            struct.pack(">H", nbd.INFO_DESCRIPTION) + b"the guest disk"])
    assert server.export is None  # INFO does not start transmission
    evs = events(server, client.option(nbd.OPT_GO, client.go_data("disk0")))
    assert [type(e) for e in evs] == [ExportSelected]


def test_go_unknown_export_then_retry() -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    assert events(server, struct.pack(">I", 3) + client.option(nbd.OPT_GO, client.go_data("nope"))) == []
    client.feed(server.data_to_send())
    assert client.option_replies()[0][:2] == (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN)
    assert [type(e) for e in events(server, client.option(nbd.OPT_GO, client.go_data("disk0")))] == [
        ExportSelected]


@pytest.mark.parametrize("data", [b"", b"\0\0", b"\0\0\0\x09disk0\0\0", b"\0\0\0\x05disk0\0\x01", b"\xff" * 12])
def test_go_malformed_is_invalid(data: bytes) -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    assert events(server, struct.pack(">I", 3) + client.option(nbd.OPT_GO, data)) == []
    client.feed(server.data_to_send())
    assert client.option_reply()[:2] == (nbd.OPT_GO, nbd.REP_ERR_INVALID)
    assert not server.closed


def test_list() -> None:
    server = NBDServer({"a": Export("a", 1), "disk0": Export("disk0", 2)})
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    assert events(server, struct.pack(">I", 3) + client.option(nbd.OPT_LIST)
                  + client.option(nbd.OPT_LIST, b"x")) == []
    client.feed(server.data_to_send())
    assert client.option_replies() == [(nbd.OPT_LIST, nbd.REP_SERVER, b"\0\0\0\x01a"),
                                       (nbd.OPT_LIST, nbd.REP_SERVER, b"\0\0\0\x05disk0"),
                                       (nbd.OPT_LIST, nbd.REP_ACK, b"")]
    assert client.option_reply()[:2] == (nbd.OPT_LIST, nbd.REP_ERR_INVALID)


def test_abort() -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    evs = events(server, struct.pack(">I", 3) + client.option(nbd.OPT_ABORT) + b"ignored after abort")
    assert evs == [Disconnect()] and server.closed
    client.feed(server.data_to_send())
    assert client.option_reply() == (nbd.OPT_ABORT, nbd.REP_ACK, b"") and not client.buf


def test_unknown_option_data_is_consumed() -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    stream = (struct.pack(">I", 3) + client.option(99, b"\x25\x60\x95\x13" * 100)
              + client.option(nbd.OPT_STARTTLS) + client.option(nbd.OPT_GO, client.go_data("disk0")))
    assert [type(e) for e in events(server, stream)] == [ExportSelected]
    client.feed(server.data_to_send())
    assert client.option_reply() == (99, nbd.REP_ERR_UNSUP, b"")
    assert client.option_reply() == (nbd.OPT_STARTTLS, nbd.REP_ERR_UNSUP, b"")
    assert client.option_replies()[-1] == (nbd.OPT_GO, nbd.REP_ACK, b"")


@pytest.mark.parametrize("stream", [
    struct.pack(">I", 4),  # unknown client flag
    struct.pack(">I", 3) + b"IHAVEOPX" + bytes(8),  # bad option magic
    struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, 99, nbd.MAX_OPTION_LENGTH + 1),  # too long
])
def test_handshake_protocol_errors(stream: bytes) -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    server.data_to_send()
    evs = events(server, stream)
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError) and server.closed
    assert events(server, Client.option(nbd.OPT_LIST)) == [] and server.data_to_send() == b""


def test_export_validation() -> None:
    with pytest.raises(ValueError):
        Export("disk0", -1)
    with pytest.raises(ValueError):
        Export("x" * 4097, 1)
    with pytest.raises(ValueError):
        NBDServer({"a": Export("b", 1)})


# --- transmission ----------------------------------------------------------------------------------------

def test_every_command() -> None:
    server, client = rw_server()
    payload = bytes(range(256)) * 16
    evs = events(server, client.request(nbd.CMD_WRITE, 1, 4096, payload=payload, flags=nbd.CMD_FLAG_FUA)
                 + client.request(nbd.CMD_WRITE_ZEROES, 2, 8192, 4096, flags=nbd.CMD_FLAG_NO_HOLE)
                 + client.request(nbd.CMD_FLUSH, 3)
                 + client.request(nbd.CMD_TRIM, 4, 0, 512)
                 + client.request(nbd.CMD_READ, 5, 4096, 100)
                 + client.request(nbd.CMD_DISC, 6))
    assert evs == [Write(1, 4096, payload, nbd.CMD_FLAG_FUA), WriteZeroes(2, 8192, 4096, nbd.CMD_FLAG_NO_HOLE),
                   Flush(3), Trim(4, 0, 512), Read(5, 4096, 100), Disconnect()]
    assert server.closed
    for ev in evs[:4]:
        server.reply(ev.handle)  # type: ignore[union-attr]
    server.reply(5, data=payload[:100])
    client.feed(server.data_to_send())
    assert [client.simple_reply() for _ in range(4)] == [(0, h, b"") for h in (1, 2, 3, 4)]
    assert client.simple_reply(100) == (0, 5, payload[:100]) and not client.buf
    assert events(server, client.request(nbd.CMD_FLUSH, 7)) == []  # nothing after DISC


def test_write_payload_is_a_view_of_the_received_chunk() -> None:
    server, client = rw_server()
    chunk = client.request(nbd.CMD_WRITE, 1, 0, payload=b"x" * 4096)
    (ev,) = events(server, chunk)
    assert isinstance(ev, Write) and isinstance(ev.data, memoryview) and ev.data.obj is chunk


def test_payload_wanted_counts_down_a_write_whose_header_came_alone() -> None:
    """QEMU sends a WRITE's header and payload in two sendmsgs; the transport asks for exactly what is missing."""
    server, client = rw_server()
    stream = client.request(nbd.CMD_WRITE, 3, 4096, payload=b"y" * 4096)
    assert server.payload_wanted == 0
    assert events(server, stream[:nbd.REQUEST_SIZE]) == [] and server.payload_wanted == 4096
    assert events(server, stream[nbd.REQUEST_SIZE:nbd.REQUEST_SIZE + 1000]) == [] and server.payload_wanted == 3096
    server.receive_data(stream[nbd.REQUEST_SIZE + 1000:])
    assert server.payload_wanted == 0  # all there, not parsed yet
    assert events(server) == [Write(3, 4096, b"y" * 4096, 0)] and server.payload_wanted == 0


def test_borrowed_receive_parses_in_place_and_keeps_nothing_of_the_buffer() -> None:
    """The blocking transport receives every chunk into one buffer: once next_event() has returned None, no byte
    of it may be needed again (a frame split across receives is copied), so scribbling over it changes nothing."""
    requests = [Client.request(nbd.CMD_WRITE, h, h * 512, payload=bytes([h]) * (100 * h)) for h in range(1, 30)]
    stream = b"".join(requests) + Client.request(nbd.CMD_FLUSH, 99)
    want, _ = rw_server()
    expected = [(type(e), getattr(e, "handle", None), bytes(getattr(e, "data", b""))) for e in events(want, stream)]
    for step in (1, 7, 28, 29, 4096):
        server, _ = rw_server()
        buf = bytearray(8192)
        got = []
        for i in range(0, len(stream), step):
            n = len(stream[i : i + step])
            buf[:n] = stream[i : i + step]
            server.receive_borrowed(memoryview(buf)[:n])
            while (ev := server.next_event()) is not None:
                got.append((type(ev), getattr(ev, "handle", None), bytes(getattr(ev, "data", b""))))
            assert server.drained
            buf[:] = b"\xee" * len(buf)
        assert got == expected, step


def test_borrowed_receive_only_when_drained() -> None:
    server, client = rw_server()
    server.receive_data(client.request(nbd.CMD_FLUSH, 1))
    assert not server.drained
    with pytest.raises(ValueError):
        server.receive_borrowed(memoryview(bytearray(client.request(nbd.CMD_FLUSH, 2))))
    assert events(server) == [Flush(1)] and server.drained


def test_large_write_in_many_chunks() -> None:
    server, client = rw_server(size=64 << 20)
    payload = bytes(range(256)) * (nbd.MAX_PAYLOAD // 256)
    stream = client.request(nbd.CMD_WRITE, 9, 0, payload=payload) + client.request(nbd.CMD_FLUSH, 10)
    got: list[nbd.Event] = []
    for i in range(0, len(stream), 1 << 20):
        got += events(server, stream[i : i + (1 << 20)])
        assert server.buffered <= nbd.MAX_BUFFERED
    assert got == [Write(9, 0, payload, 0), Flush(10)]


def test_errors_are_replied_and_the_connection_continues() -> None:
    server, client = rw_server()
    bad = [
        (client.request(nbd.CMD_WRITE, 1, SIZE - 512, payload=bytes(1024)), nbd.ENOSPC),  # past the end
        (client.request(nbd.CMD_WRITE, 2, SIZE + 1, payload=b""), nbd.ENOSPC),
        (client.request(nbd.CMD_WRITE_ZEROES, 3, SIZE, 1), nbd.ENOSPC),
        (client.request(nbd.CMD_TRIM, 4, 2**64 - 1, 1), nbd.EINVAL),
        (client.request(nbd.CMD_READ, 5, SIZE - 1, 2), nbd.EINVAL),
        (client.request(nbd.CMD_WRITE, 6, 0, payload=b"abc", flags=nbd.CMD_FLAG_DF), nbd.EINVAL),
        (client.request(nbd.CMD_WRITE_ZEROES, 7, 0, 1, flags=nbd.CMD_FLAG_FAST_ZERO), nbd.EINVAL),
        (client.request(nbd.CMD_READ, 8, 0, 1, flags=nbd.CMD_FLAG_DF), nbd.EINVAL),
        (client.request(nbd.CMD_FLUSH, 9, 0, 1), nbd.EINVAL),
        (client.request(nbd.CMD_CACHE, 10, 0, 1), nbd.EINVAL),
        (client.request(nbd.CMD_BLOCK_STATUS, 11, 0, 1), nbd.EINVAL),
        (client.request(999, 12, 0, 1), nbd.EINVAL),
    ]
    assert events(server, b"".join(req for req, _ in bad)) == []
    client.feed(server.data_to_send())
    assert [client.simple_reply() for _ in bad] == [(err, i, b"") for i, (_, err) in enumerate(bad, 1)]
    assert events(server, client.request(nbd.CMD_WRITE, 13, SIZE - 3, payload=b"end")) == [
        Write(13, SIZE - 3, b"end", 0)]


def test_zero_length_requests_are_acked_without_an_event() -> None:
    server, client = rw_server()
    reqs = [client.request(kind, h, SIZE, 0) for h, kind in
            enumerate((nbd.CMD_WRITE, nbd.CMD_WRITE_ZEROES, nbd.CMD_TRIM, nbd.CMD_READ), 1)]
    assert events(server, b"".join(reqs)) == []
    client.feed(server.data_to_send())
    assert [client.simple_reply() for _ in reqs] == [(0, h, b"") for h in (1, 2, 3, 4)] and not client.buf


def test_read_replies_are_checked() -> None:
    server, client = rw_server()
    assert events(server, client.request(nbd.CMD_READ, 1, 0, 8) + client.request(nbd.CMD_READ, 1, 0, 8)) == [
        Read(1, 0, 8)]  # a second READ on an unanswered handle is refused
    with pytest.raises(ValueError):
        server.reply(1, data=b"short")
    with pytest.raises(ValueError):
        server.reply(2, data=b"not a read")
    server.reply(1, error=nbd.EIO)
    client.feed(server.data_to_send())
    assert client.simple_reply() == (nbd.EINVAL, 1, b"")
    assert client.simple_reply() == (nbd.EIO, 1, b"") and not client.buf


@pytest.mark.parametrize("request_bytes", [
    b"\x25\x60\x95\x14" + bytes(24),  # bad magic
    Client.request(nbd.CMD_WRITE, 1, 0, nbd.MAX_PAYLOAD + 1),
    Client.request(nbd.CMD_READ, 1, 0, nbd.MAX_PAYLOAD + 1),
])
def test_transmission_protocol_errors_close(request_bytes: bytes) -> None:
    server, client = rw_server()
    evs = events(server, client.request(nbd.CMD_FLUSH, 1) + request_bytes + client.request(nbd.CMD_FLUSH, 2))
    assert evs[0] == Flush(1) and isinstance(evs[1], ProtocolError) and len(evs) == 2
    assert server.closed and server.buffered == 0
    assert events(server, client.request(nbd.CMD_FLUSH, 3)) == []


def test_byte_by_byte_equals_one_chunk() -> None:
    stream = (struct.pack(">I", 3) + Client.option(nbd.OPT_STRUCTURED_REPLY) + Client.option(99, b"junk")
              + Client.option(nbd.OPT_GO, Client.go_data("disk0", (nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME)))
              + Client.request(nbd.CMD_WRITE, 1, 512, payload=b"hello world" * 50)
              + Client.request(nbd.CMD_WRITE, 2, SIZE, payload=b"refused")
              + Client.request(nbd.CMD_WRITE_ZEROES, 3, 0, 4096)
              + Client.request(nbd.CMD_READ, 4, 0, 16)
              + Client.request(nbd.CMD_FLUSH, 5)
              + Client.request(nbd.CMD_DISC, 6))

    def run(chunks: list[bytes]) -> tuple[list[nbd.Event], bytes]:
        server = NBDServer({"disk0": Export("disk0", SIZE)})
        out, evs = bytearray(server.data_to_send()), []
        for chunk in chunks:
            server.receive_data(chunk)
            while (ev := server.next_event()) is not None:  # reply as we go, as the transport does
                evs.append(ev)
                if isinstance(ev, Read):
                    server.reply(ev.handle, data=bytes(ev.length))
                elif isinstance(ev, Write | WriteZeroes | Flush | Trim):
                    server.reply(ev.handle)
            out += server.data_to_send()
        return evs, bytes(out)

    whole = run([stream])
    assert [type(e) for e in whole[0]] == [ExportSelected, Write, WriteZeroes, Read, Flush, Disconnect]
    assert run([stream[i : i + 1] for i in range(len(stream))]) == whole


def test_many_chunks_queued_before_draining() -> None:
    server, client = rw_server()
    for h in range(1, 4):
        server.receive_data(bytearray(client.request(nbd.CMD_WRITE, h, h * 512, payload=bytes([h]) * 512)))
    assert events(server) == [Write(h, h * 512, bytes([h]) * 512, 0) for h in range(1, 4)]


def test_read_only_export() -> None:
    server = NBDServer({"ro": Export("ro", SIZE, read_only=True)})
    client = Client()
    handshake(server, client, "ro")
    replies = client.option_replies()
    ro_flags = nbd.FLAG_HAS_FLAGS | nbd.FLAG_READ_ONLY | nbd.FLAG_SEND_FLUSH
    assert struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, ro_flags) in [data for _, _, data in replies]
    evs = events(server, client.request(nbd.CMD_WRITE, 1, 0, payload=b"no" * 100)
                 + client.request(nbd.CMD_WRITE_ZEROES, 2, 0, 512) + client.request(nbd.CMD_TRIM, 3, 0, 512)
                 + client.request(nbd.CMD_READ, 4, 0, 4) + client.request(nbd.CMD_FLUSH, 5))
    assert evs == [Read(4, 0, 4), Flush(5)]
    client.feed(server.data_to_send())
    assert [client.simple_reply() for _ in range(3)] == [(nbd.EPERM, h, b"") for h in (1, 2, 3)]


def test_connection_lost() -> None:
    server, client = rw_server()
    server.receive_data(client.request(nbd.CMD_WRITE, 1, 0, 4096)[:40])
    assert server.next_event() is None
    server.connection_lost()
    assert server.closed and server.buffered == 0 and events(server, b"x" * 100) == []


# --- hostile offsets and lengths (issue 9) ---------------------------------------------------------------

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1


@pytest.mark.parametrize(("kind", "error"), [
    (nbd.CMD_WRITE, nbd.ENOSPC), (nbd.CMD_WRITE_ZEROES, nbd.ENOSPC), (nbd.CMD_TRIM, nbd.EINVAL),
    (nbd.CMD_READ, nbd.EINVAL)])
@pytest.mark.parametrize(("offset", "length"), [
    (SIZE, 1),  # just past the end
    (SIZE - 1, 2),  # straddling the end
    (U64_MAX, 1),  # offset + length = 2^64: wraps to 0 in a 64-bit server
    (U64_MAX, 0),  # zero length, still out of range
    (U64_MAX - 511, 512),  # ends exactly at 2^64
    (2**63, 512),  # negative as a signed 64-bit offset
    (1, U32_MAX),  # a length larger than the export (WRITE/READ: no payload follows, see below)
    (U64_MAX - U32_MAX + 1, U32_MAX),
])
def test_requests_beyond_the_export_are_refused(kind: int, error: int, offset: int, length: int) -> None:
    """Every range check is in unbounded integers: no wrap-around at 2^64, no event reaches the backend,
    and the connection goes on (a refused WRITE's payload is skipped, not held)."""
    server, client = rw_server()
    payload_len = length if kind == nbd.CMD_WRITE and length <= nbd.MAX_PAYLOAD else 0
    if kind in (nbd.CMD_WRITE, nbd.CMD_READ) and length > nbd.MAX_PAYLOAD:
        # Over the maximum payload we advertised: a WRITE's payload cannot be framed, a READ is a protocol
        # violation; both hang up rather than allocate.
        evs = events(server, client.request(kind, 1, offset, length))
        assert len(evs) == 1 and isinstance(evs[0], ProtocolError) and server.closed
        return
    req = client.request(kind, 1, offset, length, payload=bytes(payload_len)) if payload_len else \
        client.request(kind, 1, offset, length)
    after = client.request(nbd.CMD_WRITE, 2, SIZE - 3, payload=b"end")
    assert events(server, req + after) == [Write(2, SIZE - 3, b"end", 0)]
    client.feed(server.data_to_send())
    assert client.simple_reply() == (error, 1, b"")
    assert server.buffered == 0 and not server.closed


def test_exact_end_is_accepted() -> None:
    server, client = rw_server()
    evs = events(server, client.request(nbd.CMD_WRITE_ZEROES, 1, 0, SIZE) + client.request(nbd.CMD_TRIM, 2, 0, SIZE)
                 + client.request(nbd.CMD_READ, 3, SIZE - 512, 512))
    assert evs == [WriteZeroes(1, 0, SIZE, 0), Trim(2, 0, SIZE), Read(3, SIZE - 512, 512)]


def test_queued_output_counts_what_waits_to_be_sent() -> None:
    """The transport's backpressure reads `queued_output`: it must grow with each reply and drop to 0 when
    data_to_send() takes it; SEND_THRESHOLD + one largest reply is the stated bound."""
    server, client = rw_server()
    assert server.queued_output == 0
    assert events(server, client.request(nbd.CMD_READ, 1, 0, 4096)) == [Read(1, 0, 4096)]
    server.reply(1, data=bytes(4096))
    assert server.queued_output == 16 + 4096
    assert len(server.data_to_send()) == 16 + 4096 and server.queued_output == 0
    assert nbd.MAX_OUTSTANDING == nbd.SEND_THRESHOLD + nbd.MAX_PAYLOAD + 16 <= 2 * nbd.MAX_PAYLOAD + 16


# --- TLS (NBD_OPT_STARTTLS, FORCEDTLS mode) ---------------------------------------------------------------

def tls_server() -> tuple[NBDServer, Client]:
    server = NBDServer({"disk0": Export("disk0", SIZE)}, tls=True)
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    assert events(server, struct.pack(">I", 3)) == []
    return server, client


def test_tls_required_refuses_every_option_before_starttls() -> None:
    server, client = tls_server()
    opts = [(nbd.OPT_LIST, b""), (nbd.OPT_STRUCTURED_REPLY, b""), (nbd.OPT_INFO, client.go_data("disk0")),
            (nbd.OPT_GO, client.go_data("disk0")), (99, b"junk")]
    assert events(server, b"".join(client.option(o, d) for o, d in opts)) == []
    client.feed(server.data_to_send())
    for opt, _ in opts:
        got_opt, rep, _msg = client.option_reply()
        assert (got_opt, rep) == (opt, nbd.REP_ERR_TLS_REQD)
    assert not client.buf and server.export is None and not server.tls_started
    # ABORT is still honoured in clear.
    assert events(server, client.option(nbd.OPT_ABORT)) == [Disconnect()]


def test_tls_required_export_name_hangs_up() -> None:
    server, client = tls_server()
    evs = events(server, client.option(nbd.OPT_EXPORT_NAME, b"disk0"))
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError) and "TLS" in evs[0].message
    assert server.closed and server.export is None
    assert server.data_to_send() == b""  # no export size, no flags: nothing in clear


def test_tls_required_needs_fixed_newstyle() -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)}, tls=True)
    server.data_to_send()
    evs = events(server, struct.pack(">I", 0))
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError) and server.closed


def test_starttls_then_the_handshake_goes_on_inside_tls() -> None:
    server, client = tls_server()
    assert events(server, client.option(nbd.OPT_STARTTLS)) == [nbd.StartTLS()]
    assert server.tls_started
    client.feed(server.data_to_send())
    assert client.option_reply() == (nbd.OPT_STARTTLS, nbd.REP_ACK, b"") and not client.buf
    # What follows is what the transport decrypted: ordinary option haggling, then transmission.
    evs = events(server, client.option(nbd.OPT_STARTTLS) + client.option(nbd.OPT_GO, client.go_data("disk0")))
    assert [type(e) for e in evs] == [ExportSelected]
    client.feed(server.data_to_send())
    assert client.option_reply()[:2] == (nbd.OPT_STARTTLS, nbd.REP_ERR_INVALID)  # already running
    assert client.option_replies()[-1] == (nbd.OPT_GO, nbd.REP_ACK, b"")


def test_starttls_with_data_is_invalid() -> None:
    server, client = tls_server()
    assert events(server, client.option(nbd.OPT_STARTTLS, b"x")) == []
    client.feed(server.data_to_send())
    assert client.option_reply()[:2] == (nbd.OPT_STARTTLS, nbd.REP_ERR_INVALID)
    assert not server.tls_started and not server.closed


def test_bytes_in_clear_behind_starttls_are_refused() -> None:
    """A client (or a man in the middle) that sends a GO in clear right behind STARTTLS must not have it
    taken as if it had come through TLS."""
    server, client = tls_server()
    evs = events(server, client.option(nbd.OPT_STARTTLS) + client.option(nbd.OPT_GO, client.go_data("disk0")))
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError) and server.closed
    assert not server.tls_started and server.export is None and server.data_to_send() == b""


def test_starttls_without_tls_configured_is_unsupported() -> None:
    server = NBDServer({"disk0": Export("disk0", SIZE)})
    client = Client()
    client.feed(server.data_to_send())
    client.greeting()
    assert events(server, struct.pack(">I", 3) + client.option(nbd.OPT_STARTTLS)) == []
    client.feed(server.data_to_send())
    assert client.option_reply() == (nbd.OPT_STARTTLS, nbd.REP_ERR_UNSUP, b"")
    assert not server.tls_started


def test_tls_required_random_options_never_reach_an_export_in_clear() -> None:
    """Whatever a client sends in clear (any option, any data, any split), a TLS server never selects an
    export nor sends export facts before StartTLS, and never raises."""
    import random

    rng = random.Random(9)
    options = (nbd.OPT_EXPORT_NAME, nbd.OPT_ABORT, nbd.OPT_LIST, nbd.OPT_STARTTLS, nbd.OPT_INFO, nbd.OPT_GO,
               nbd.OPT_STRUCTURED_REPLY, 99)
    for _ in range(2000):
        server, client = tls_server()
        stream = b"".join(client.option(rng.choice(options), rng.randbytes(rng.choice((0, 0, 6, 12))))
                          for _ in range(rng.randint(1, 6)))
        cut = rng.randint(0, len(stream))
        evs = events(server, stream[:cut]) + events(server, stream[cut:])
        started = next((i for i, e in enumerate(evs) if isinstance(e, nbd.StartTLS)), len(evs))
        assert not any(isinstance(e, ExportSelected) for e in evs[:started])
        if started == len(evs):
            assert server.export is None and not server.tls_started
            assert struct.pack(">Q", SIZE) not in bytes(server.data_to_send())

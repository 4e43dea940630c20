"""The NBD transport with real libnbd clients beside hostile ones: the server keeps serving everyone."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from tap import nbd
from tap.replica import BlockReplica
from tap.server import TapBackend, open_listeners, serve_nbd
from tap.writelog import KIND_WRITE, WriteLog, read_records
from tests.support import require_tools

pytestmark = pytest.mark.integration
SIZE = 8 << 20


async def _garbage_client(path: str, payload: bytes) -> bytes:
    """Send junk after the greeting; return what the server sent before closing on us."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    got = b""
    with trio.fail_after(10):
        got += await sock.recv(4096)
        await sock.send(payload)
        while chunk := await sock.recv(4096):
            got += chunk
    sock.close()
    return got


def test_libnbd_writes_and_reads_while_hostile_clients_are_dropped(tmp_path):
    require_tools("nbdcopy", "nbdinfo")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 4) + os.urandom(SIZE // 4))
    sock = str(tmp_path / "nbd.sock")
    writelog = WriteLog(tmp_path / "log")
    replica = BlockReplica(tmp_path / "replica.img", SIZE)
    backend = TapBackend(replica=replica, writelog=writelog)
    url = f"nbd+unix:///disk?socket={sock}"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await open_listeners([f"unix:{sock}"])
            await nursery.start(serve_nbd, listeners, {"disk": nbd.Export("disk", SIZE)}, backend)
            junk = [b"\x00" * 64, b"garbage" * 1000,
                    (3).to_bytes(4, "big") + nbd.IHAVEOPT.to_bytes(8, "big") + (7).to_bytes(4, "big")
                    + (0xFFFFFFFF).to_bytes(4, "big")]  # GO with a 4 GiB option length
            results = []

            async def hostile(p: bytes) -> None:
                results.append(await _garbage_client(sock, p))

            for p in junk:
                nursery.start_soon(hostile, p)
            await trio.run_process(["nbdcopy", str(src), url])
            await trio.run_process(["nbdcopy", url, str(tmp_path / "back.raw")])
            info = await trio.run_process(["nbdinfo", "--size", url], capture_stdout=True)
            assert int(info.stdout) == SIZE
            await trio.sleep(0.2)
            assert len(results) == len(junk), "a hostile client was not disconnected"
            nursery.cancel_scope.cancel()

    trio.run(main)
    writelog.close()
    replica.close()
    assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()
    assert (tmp_path / "replica.img").read_bytes() == src.read_bytes()
    records = list(read_records(tmp_path / "log"))
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert any(r.kind == KIND_WRITE for r in records)
    assert backend.stats.errors == 3  # each hostile client was reported and dropped

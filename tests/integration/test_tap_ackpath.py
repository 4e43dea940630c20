"""The ack path (issue 13): a WRITE is acked once its record is in the log, and its replica write follows under
the same hold of the backend's lock. A client sees its own writes (and every other client's acked ones) in
READs, the replica follows the log in seq order, and a replica write that fails after the ack leaves the write
standing in the log and the replica lagging, loudly, until the next attach catches it up.

The trio server with a writable TapBackend runs in the test process; the clients are raw sockets that send a
WRITE's header and payload in two sends, as QEMU does."""

from __future__ import annotations

import os
import time

import pytest

from tap import nbd
from tap.replica import BlockReplica
from tap.server import TapBackend
from tap.writelog import KIND_WRITE, WriteLog, read_records
from tests.integration.test_tap_limits import SIZE, _nbd_client, _request, _serve_while, _simple_reply

pytestmark = pytest.mark.integration


def _write(c, handle: int, offset: int, payload: bytes, flags: int = 0) -> None:
    c.sendall(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, nbd.CMD_WRITE, handle, offset, len(payload)))
    time.sleep(0.001)  # the payload trails its header, as QEMU's two sendmsgs often do
    c.sendall(payload)


def test_acked_writes_are_read_back_on_every_connection_and_the_replica_follows_the_log(tmp_path):
    """Plain and FUA writes, overlapping, each READ right after its ack on the writer's connection or another."""
    sock = str(tmp_path / "nbd.sock")
    writelog = WriteLog(tmp_path / "log")
    replica = BlockReplica(tmp_path / "replica.img", SIZE)
    backend = TapBackend(replica=replica, writelog=writelog)
    writes = [(i % 7 * 4096, bytes([i]) * 4096) for i in range(1, 41)]  # overlapping: order matters

    def client() -> list[tuple[int, int, bytes]]:
        a, b = _nbd_client(sock), _nbd_client(sock)
        got = []
        for h, (off, data) in enumerate(writes, 1):
            _write(a, h, off, data, nbd.CMD_FLAG_FUA if h % 5 == 0 else 0)  # FUA: fsynced, then acked
            got.append(_simple_reply(a))
            reader = a if h % 2 else b  # the writer's own connection, or another one
            reader.sendall(_request(nbd.CMD_READ, 1000 + h, off, 4096))
            got.append(_simple_reply(reader, 4096))
        a.close()
        b.close()
        return got

    got = _serve_while(sock, backend, client, timeout=60)
    assert got == [r for h, (_, data) in enumerate(writes, 1) for r in ((0, h, b""), (0, 1000 + h, data))]
    recs = list(read_records(tmp_path / "log"))
    assert [(r.kind, r.offset, r.payload) for r in recs] == [(KIND_WRITE, off, data) for off, data in writes]
    assert replica.applied_seq == writelog.last_seq == len(writes) and not backend.lagging
    final = dict(writes)  # the last write to each offset
    assert all(replica.read(off, 4096) == data for off, data in final.items())
    writelog.close()
    replica.close()


def test_a_replica_write_failing_after_the_ack_leaves_the_write_in_the_log_and_the_replica_lagging(tmp_path):
    sock = str(tmp_path / "nbd.sock")
    writelog = WriteLog(tmp_path / "log")
    replica = BlockReplica(tmp_path / "replica.img", SIZE)
    backend = TapBackend(replica=replica, writelog=writelog)
    rw_fd = replica._fd

    def client() -> list[tuple[int, int, bytes]]:
        c = _nbd_client(sock)
        _write(c, 1, 0, b"a" * 4096)
        c.sendall(_request(nbd.CMD_READ, 9, 0, 1))  # answered once seq 1 is in the replica (it follows the ack)
        got = [_simple_reply(c), _simple_reply(c, 1)]
        replica._fd = os.open(replica.path, os.O_RDONLY)  # the replica's next pwrite fails (EBADF)
        _write(c, 2, 4096, b"b" * 4096)
        _write(c, 3, 0, b"c" * 4096)
        got += [_simple_reply(c), _simple_reply(c)]
        c.sendall(_request(nbd.CMD_READ, 4, 0, 4096))
        got.append(_simple_reply(c, 4096))
        c.close()
        return got

    got = _serve_while(sock, backend, client, timeout=30)
    os.close(replica._fd)
    replica._fd = rw_fd
    # both writes after the failure are acked: they are in the log; only the read of the stale replica fails
    assert got == [(0, 1, b""), (0, 9, b"a"), (0, 2, b""), (0, 3, b""), (nbd.EIO, 4, b"")]
    assert [r.payload[:1] for r in read_records(tmp_path / "log")] == [b"a", b"b", b"c"]
    assert "stopped following the log at seq 1: writing seq 2 to it failed" in backend.lagging
    assert backend.stats.errors == 2 and backend.lagging in backend.stats.last_error  # the failed write, the read
    assert replica.applied_seq == 1
    replica.checkpoint()  # as a detach does: the sidecar keeps seq 1
    replica.close()
    writelog.close()
    with BlockReplica(tmp_path / "replica.img", SIZE) as again:  # the next attach
        assert again.applied_seq == 1
        assert again.catch_up(tmp_path / "log") == 3
        assert again.read(0, 8192) == b"c" * 4096 + b"b" * 4096

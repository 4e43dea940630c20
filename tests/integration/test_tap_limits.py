"""The NBD server against hostile and real clients (issue 9): replies a client never reads, connection floods,
requests beyond the export, and TLS (x509, as QEMU takes it) with libnbd and qemu-img as the clients.

Servers are real: `mirrorfs serve` in its own process (so its memory is measured alone), or the trio server with
a writable TapBackend in the test process. Clients are raw sockets speaking NBD, nbdinfo, nbdcopy and qemu-img.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from tap import nbd
from tap.replica import BlockReplica
from tap.server import MAX_CONNECTIONS, TapBackend, open_listeners, serve_nbd
from tap.state import EXPORT_NAME, StateDir
from tap.writelog import KIND_WRITE, WriteLog, read_records
from tests.support import REPO, require_tools

pytestmark = pytest.mark.integration

SIZE = 64 << 20
U64_MAX = 2**64 - 1
MiB = 1 << 20
T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"server closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _option(opt: int, data: bytes = b"") -> bytes:
    return nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, opt, len(data)) + data


def _go(name: str = EXPORT_NAME) -> bytes:
    raw = name.encode()
    return _option(nbd.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))


def _request(kind: int, handle: int, offset: int, length: int, payload: bytes = b"") -> bytes:
    return nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, kind, handle, offset, length) + payload


def _nbd_client(path: str | Path, timeout: float = 10) -> socket.socket:
    """A raw NBD client through the handshake (fixed newstyle, NBD_OPT_GO), ready for requests."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    magic, opt_magic, _ = nbd.GREETING.unpack(_recv_exact(sock, nbd.GREETING.size))
    assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    sock.sendall(struct.pack(">I", 3) + _go())
    while True:
        magic, _, rep, length = nbd.OPTION_REPLY.unpack(_recv_exact(sock, nbd.OPTION_REPLY.size))
        assert magic == nbd.OPTION_REPLY_MAGIC
        _recv_exact(sock, length)
        if rep == nbd.REP_ACK:
            return sock
        assert rep == nbd.REP_INFO, f"option reply {rep:#x}"


def _simple_reply(sock: socket.socket, read_length: int = 0) -> tuple[int, int, bytes]:
    magic, error, handle = nbd.SIMPLE_REPLY.unpack(_recv_exact(sock, nbd.SIMPLE_REPLY.size))
    assert magic == nbd.SIMPLE_REPLY_MAGIC
    return error, handle, _recv_exact(sock, read_length) if read_length and not error else b""


def _serve_while(sock: str, backend: TapBackend, client: Callable[[], T], *, timeout: float) -> T:
    """The trio server in this process on unix:`sock` while a blocking `client` runs in a thread; its result."""
    async def main() -> T:
        async with trio.open_nursery() as nursery:
            listeners = await open_listeners([f"unix:{sock}"])
            await nursery.start(serve_nbd, listeners, {EXPORT_NAME: nbd.Export(EXPORT_NAME, SIZE)}, backend)
            with trio.fail_after(timeout):
                got = await trio.to_thread.run_sync(client)
            nursery.cancel_scope.cancel()
        return got

    return trio.run(main)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_state(tmp_path: Path, pattern: bytes) -> Path:
    """A state directory of a stopped attach (no log records), its replica holding `pattern` at offset 0."""
    d = tmp_path / "state"
    st = StateDir(d)
    st.prepare()
    st.init_state(SIZE, "test")
    replica = BlockReplica(st.replica, SIZE)
    replica.write(0, pattern)
    replica.checkpoint()
    replica.close()
    return d


class Serve:
    """`mirrorfs serve` in its own process; stderr (its log lines) collected at stop()."""

    def __init__(self, state: Path, *args: str | Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirrorfs.cli", "serve", "--state", str(state), *map(str, args)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if "serving" not in line:
            self.stop()
            raise AssertionError(f"mirrorfs serve did not start: {line!r} {self.stderr!r}")
        self.stderr = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, self.stderr = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
        return self.stderr

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(argv: list[str | Path], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=timeout)


# --- replies a client never reads ---------------------------------------------------------------------------

FLOOD_REQUESTS = 10_000
# Each flooding connection holds at most nbd.MAX_OUTSTANDING (33 MiB) of replies plus its received, unparsed
# requests (< 1 MiB + one frame); a READ's data is read from the replica before it is queued (32 MiB more,
# transient). Two flooders: ~2 x 34 + 32 MiB; the bound leaves room for allocator slack, not for a third reply.
FLOODERS = 2
PEAK_BOUND_MIB = 160


def test_replies_never_read_hold_bounded_memory_and_others_are_served(tmp_path):
    """Without the bound, one 280 KB burst of READs asks the server for 10,000 x 32 MiB = 312 GiB of replies."""
    require_tools("nbdinfo", "nbdcopy")
    pattern = os.urandom(SIZE)
    sock = tmp_path / "nbd.sock"
    url = f"nbd+unix:///{EXPORT_NAME}?socket={sock}"
    with Serve(_make_state(tmp_path, pattern), "--listen", f"unix:{sock}") as srv:
        assert _run(["nbdinfo", "--size", url]).stdout.strip() == str(SIZE)
        base_kib = _status_kib(srv.proc.pid, "VmRSS")
        burst = b"".join(_request(nbd.CMD_READ, h, 0, nbd.MAX_PAYLOAD) for h in range(FLOOD_REQUESTS))
        flooders, sent = [], []
        for _ in range(FLOODERS):
            f = _nbd_client(sock)
            f.setblocking(False)
            n, deadline = 0, time.monotonic() + 5
            while n < len(burst) and time.monotonic() < deadline:  # send what the server takes, never read
                try:
                    n += f.send(burst[n:])
                except BlockingIOError:
                    select.select([], [f], [], 0.2)
            flooders.append(f)
            sent.append(n // nbd.REQUEST_SIZE)
        assert min(sent) >= 1000, f"the server took only {sent} READ requests"

        # Others are still served while the flooders stall: a whole-export copy, byte for byte.
        t0 = time.monotonic()
        _run(["nbdcopy", url, tmp_path / "copy.raw"], timeout=60).check_returncode()
        assert (tmp_path / "copy.raw").read_bytes() == pattern
        assert time.monotonic() - t0 < 30
        info = _run(["nbdinfo", "--size", url])
        assert info.returncode == 0 and info.stdout.strip() == str(SIZE)

        peak_mib = (_status_kib(srv.proc.pid, "VmHWM") - base_kib) / 1024
        rss_mib = (_status_kib(srv.proc.pid, "VmRSS") - base_kib) / 1024
        print(f"flood: {sent} READs of 32 MiB taken, server peak +{peak_mib:.0f} MiB, now +{rss_mib:.0f} MiB")
        assert peak_mib < PEAK_BOUND_MIB, f"server grew by {peak_mib:.0f} MiB (bound {PEAK_BOUND_MIB} MiB)"

        # The flooders were served, not ignored: a first reply (header + 32 MiB of the pattern) waits for them.
        f = flooders[0]
        f.setblocking(True)
        f.settimeout(10)
        error, handle, data = _simple_reply(f, nbd.MAX_PAYLOAD)
        assert (error, handle) == (0, 0) and data == pattern[: nbd.MAX_PAYLOAD]
        for f in flooders:
            f.close()
        assert srv.alive()
        assert _run(["nbdinfo", "--size", url]).returncode == 0


# --- connection floods --------------------------------------------------------------------------------------

def test_hundred_connections_the_limit_holds_and_the_server_stays_up(tmp_path):
    require_tools("nbdinfo")
    sock = tmp_path / "nbd.sock"
    url = f"nbd+unix:///{EXPORT_NAME}?socket={sock}"
    with Serve(_make_state(tmp_path, b"x" * 4096), "--listen", f"unix:{sock}") as srv:
        conns = []
        t0 = time.monotonic()
        for _ in range(100):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(sock))  # blocking: a unix connect waits while the listen backlog is full
            c.settimeout(10)
            conns.append(c)
        greeted = refused = 0
        for c in conns:
            first = c.recv(nbd.GREETING.size)
            if first:
                assert nbd.GREETING.unpack(first + _recv_exact(c, nbd.GREETING.size - len(first)))[0] == nbd.NBDMAGIC
                greeted += 1
            else:
                refused += 1  # closed at once, before any byte
        elapsed = time.monotonic() - t0
        assert (greeted, refused) == (MAX_CONNECTIONS, 100 - MAX_CONNECTIONS)
        assert elapsed < 10, f"100 connections took {elapsed:.1f} s"
        assert _run(["nbdinfo", "--size", url]).returncode != 0  # still full: the limit holds
        for c in conns:
            c.close()
        assert srv.alive()
        deadline = time.monotonic() + 10  # the server sees the closes on its own schedule
        while (info := _run(["nbdinfo", "--size", url])).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert info.stdout.strip() == str(SIZE), info.stderr
        log = srv.stop()
    assert log.count("NBD connection refused") == 100 - MAX_CONNECTIONS + 1  # + the nbdinfo while full


def test_a_client_that_never_chooses_an_export_is_dropped(tmp_path, monkeypatch):
    """An idle connection cannot hold one of the MAX_CONNECTIONS slots for ever: HANDSHAKE_TIMEOUT
    (30 s; 0.5 s here) after connecting it is closed and logged."""
    import tap.server

    monkeypatch.setattr(tap.server, "HANDSHAKE_TIMEOUT", 0.5)
    sock = str(tmp_path / "nbd.sock")
    backend = TapBackend(replica=BlockReplica(tmp_path / "replica.img", SIZE))

    def idle() -> tuple[bytes, float]:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(sock)
        t0 = time.monotonic()
        got = _recv_exact(c, nbd.GREETING.size)
        while chunk := c.recv(100):  # say nothing; wait for the server to hang up
            got += chunk
        c.close()
        return got, time.monotonic() - t0

    got, waited = _serve_while(sock, backend, idle, timeout=10)
    backend.replica.close()
    assert len(got) == nbd.GREETING.size and 0.4 < waited < 5
    assert backend.stats.errors == 1 and "no export chosen" in backend.stats.last_error


# --- requests beyond the export -----------------------------------------------------------------------------

def test_requests_beyond_the_export_are_refused_and_the_connection_goes_on(tmp_path):
    """On the writable export (attach's): nothing out of range reaches the log or the replica."""
    sock = str(tmp_path / "nbd.sock")
    writelog = WriteLog(tmp_path / "log")
    replica = BlockReplica(tmp_path / "replica.img", SIZE)
    backend = TapBackend(replica=replica, writelog=writelog)
    hostile = [
        (_request(nbd.CMD_WRITE, 1, U64_MAX, 1, b"x"), nbd.ENOSPC),
        (_request(nbd.CMD_WRITE, 2, SIZE - 512, 1024, b"y" * 1024), nbd.ENOSPC),
        (_request(nbd.CMD_WRITE_ZEROES, 3, U64_MAX - 511, 512), nbd.ENOSPC),
        (_request(nbd.CMD_WRITE_ZEROES, 4, 0, SIZE + 1), nbd.ENOSPC),
        (_request(nbd.CMD_TRIM, 5, U64_MAX, 1), nbd.EINVAL),
        (_request(nbd.CMD_TRIM, 6, SIZE, 4096), nbd.EINVAL),
        (_request(nbd.CMD_READ, 7, U64_MAX, 1), nbd.EINVAL),
        (_request(nbd.CMD_READ, 8, SIZE - 1, 2), nbd.EINVAL),
        (_request(nbd.CMD_READ, 9, 2**63, 4096), nbd.EINVAL),
    ]

    def client() -> list[tuple[int, int, bytes]]:
        c = _nbd_client(sock)
        c.sendall(b"".join(req for req, _ in hostile) + _request(nbd.CMD_WRITE, 10, SIZE - 3, 3, b"end")
                  + _request(nbd.CMD_READ, 11, SIZE - 3, 3))
        got = [_simple_reply(c) for _ in range(len(hostile) + 1)] + [_simple_reply(c, 3)]
        c.close()
        return got

    got = _serve_while(sock, backend, client, timeout=30)
    writelog.close()
    replica.close()
    assert got == [(err, h, b"") for h, (_, err) in enumerate(hostile, 1)] + [(0, 10, b""), (0, 11, b"end")]
    assert [(r.kind, r.offset, r.length) for r in read_records(tmp_path / "log")] == [(KIND_WRITE, SIZE - 3, 3)]
    assert backend.stats.errors == 0  # refused requests are answered, not a reason to drop the client


# --- tcp needs TLS on a writable export ---------------------------------------------------------------------

def _mirrorfs(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirrorfs.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_attach_listen_tcp_without_tls_is_refused(tmp_path):
    state = tmp_path / "state"
    p = _mirrorfs("attach", "--qmp", tmp_path / "vm.qmp", "--state", state, "--listen", "tcp:127.0.0.1:10809")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "tcp:127.0.0.1:10809" in lines[0] and "authentication" in lines[0] and "--tls-creds" in lines[0]
    assert not state.exists()  # refused before anything was created or connected

    p = _mirrorfs("attach", "--qmp", tmp_path / "vm.qmp", "--state", state, "--listen", "tcp:127.0.0.1:10809",
                  "--tls-psk", tmp_path / "keys.psk")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert "PSK" in p.stderr and "Python 3.11" in p.stderr and "--tls-creds" in p.stderr

    (tmp_path / "creds").mkdir()
    p = _mirrorfs("attach", "--qmp", tmp_path / "vm.qmp", "--state", state, "--listen", "tcp:127.0.0.1:10809",
                  "--tls-creds", tmp_path / "creds")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert "missing ca-cert.pem, server-cert.pem, server-key.pem" in p.stderr
    assert not state.exists()


# --- TLS end to end ----------------------------------------------------------------------------------------

def _openssl(*args: str | Path, cwd: Path) -> None:
    p = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def _issue(d: Path, name: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
             "-days", "2", "-out", f"{name}-cert.pem", "-extfile", f"{name}.ext", cwd=d)


def make_x509(d: Path) -> tuple[Path, Path, Path]:
    """A CA, a server and a client certificate with openssl, laid out as QEMU's tls-creds-x509 and libnbd's
    tls-certificates expect: (server dir, client dir, a dir with only the CA)."""
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=mirrorfs test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    _issue(d, "server", "localhost", "basicConstraints=critical,CA:FALSE\n"
           "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
           "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _issue(d, "client", "mirrorfs-reader", "basicConstraints=critical,CA:FALSE\n"
           "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
    dirs = []
    for name, files in (("server", ("ca-cert.pem", "server-cert.pem", "server-key.pem")),
                        ("client", ("ca-cert.pem", "client-cert.pem", "client-key.pem")),
                        ("anonymous", ("ca-cert.pem",))):
        sub = d / name
        sub.mkdir()
        for f in files:
            (sub / f).write_bytes((d / f).read_bytes())
            os.chmod(sub / f, 0o600)
        dirs.append(sub)
    return dirs[0], dirs[1], dirs[2]


def test_tls_end_to_end_with_libnbd_and_qemu_img_and_plain_clients_refused(tmp_path):
    require_tools("openssl", "nbdinfo", "nbdcopy", "qemu-img")
    server_dir, client_dir, anon_dir = make_x509(tmp_path / "pki")
    pattern = os.urandom(1 << 20)
    sock = tmp_path / "nbd.sock"
    port = _free_port()
    tls_url = f"nbds+unix:///{EXPORT_NAME}?socket={sock}&tls-certificates={client_dir}"
    with Serve(_make_state(tmp_path, pattern), "--listen", f"unix:{sock}", "--listen", f"tcp:127.0.0.1:{port}",
               "--tls-creds", server_dir) as srv:
        # libnbd over TLS on the unix socket: size, and the bytes.
        info = _run(["nbdinfo", "--size", tls_url])
        assert info.returncode == 0 and info.stdout.strip() == str(SIZE), info.stderr
        _run(["nbdcopy", tls_url, tmp_path / "copy.raw"]).check_returncode()
        assert (tmp_path / "copy.raw").read_bytes()[: len(pattern)] == pattern
        # qemu-img over TLS on tcp, credentials as a tls-creds-x509 object.
        qi = _run(["qemu-img", "info", "--output=json", "--object",
                   f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client", "--image-opts",
                   f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={EXPORT_NAME},"
                   "tls-creds=tls0"])
        assert qi.returncode == 0, qi.stderr
        assert f'"virtual-size": {SIZE}' in qi.stdout
        # A plain client gets NBD_REP_ERR_TLS_REQD and no export; one without a client certificate fails the
        # TLS handshake: nobody reads the disk without a certificate from our CA.
        plain = _run(["nbdinfo", "--size", f"nbd+unix:///{EXPORT_NAME}?socket={sock}"])
        assert plain.returncode != 0 and str(SIZE) not in plain.stdout
        assert "TLS" in plain.stderr or "tls" in plain.stderr, plain.stderr
        anon = _run(["nbdinfo", "--size", f"nbds+unix:///{EXPORT_NAME}?socket={sock}&tls-certificates={anon_dir}"])
        assert anon.returncode != 0 and str(SIZE) not in anon.stdout
        qplain = _run(["qemu-img", "info", f"nbd://127.0.0.1:{port}/{EXPORT_NAME}"])
        assert qplain.returncode != 0 and str(SIZE) not in qplain.stdout
        # The raw protocol: every option but STARTTLS is refused in clear, the connection goes on.
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        _recv_exact(raw, nbd.GREETING.size)
        raw.sendall(struct.pack(">I", 3) + _option(nbd.OPT_LIST) + _go())
        for opt in (nbd.OPT_LIST, nbd.OPT_GO):
            magic, got_opt, rep, length = nbd.OPTION_REPLY.unpack(_recv_exact(raw, nbd.OPTION_REPLY.size))
            _recv_exact(raw, length)
            assert (magic, got_opt, rep) == (nbd.OPTION_REPLY_MAGIC, opt, nbd.REP_ERR_TLS_REQD)
        raw.sendall(_option(nbd.OPT_EXPORT_NAME, EXPORT_NAME.encode()))
        assert raw.recv(100) == b""  # EXPORT_NAME cannot be refused: hung up, no size sent
        raw.close()
        assert srv.alive()
        log = srv.stop()
    assert "TLS" in log  # the failed handshake was logged


def test_attach_serves_readers_over_tls_only_and_read_only(tmp_path):
    """A live attach (qemu-storage-daemon as the writer): `--listen tcp: --tls-creds` gives a certified reader
    the live disk byte for byte, refuses a plain client, and refuses writes (only the mirror job writes)."""
    require_tools("qemu-storage-daemon", "openssl", "nbdinfo", "nbdcopy")
    from images.hostwriter import HostWriter
    from tests.tapharness import Attach

    server_dir, client_dir, _ = make_x509(tmp_path / "pki")
    disk, base, new = tmp_path / "disk.raw", tmp_path / "base.raw", tmp_path / "new.raw"
    base.write_bytes(os.urandom(8 * MiB))
    disk.write_bytes(base.read_bytes())
    new.write_bytes(os.urandom(MiB))
    port = _free_port()
    tls_url = f"nbds://127.0.0.1:{port}/{EXPORT_NAME}?tls-certificates={client_dir}"
    with HostWriter(disk, tmp_path / "qsd") as hw:
        hw.start()
        with Attach(hw.qmp, tmp_path / "state", "--device", hw.node, "--base", str(base), "--no-engine",
                    "--listen", f"tcp:127.0.0.1:{port}", "--tls-creds", str(server_dir)) as attach:
            # A host write through the daemon's own export: mirrored (write-blocking) before it completes.
            _run(["nbdcopy", new, f"nbd+unix:///{hw.node}?socket={hw.export_sock}"]).check_returncode()
            _run(["nbdcopy", tls_url, tmp_path / "read.raw"]).check_returncode()
            got = (tmp_path / "read.raw").read_bytes()
            assert got[:MiB] == new.read_bytes() and got[MiB:] == base.read_bytes()[MiB:]
            inject = _run(["nbdcopy", new, tls_url])
            assert inject.returncode != 0, "a reader wrote into the recorded disk"
            plain = _run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/{EXPORT_NAME}"])
            assert plain.returncode != 0 and "TLS" in plain.stderr
            attach.detach()
        hw.stop()
    assert disk.read_bytes()[:MiB] == new.read_bytes()
    recorded = [r for r in read_records(tmp_path / "state" / "log") if r.kind == KIND_WRITE]
    assert sum(r.length for r in recorded) >= MiB

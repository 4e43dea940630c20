"""Who may read a state directory (issue 9): modes fixed whatever the umask, --group, tightening, sockets.

Runs as root where it can (chown to another uid/gid needs it); the live attach and mount are in
tests/integration/test_local_users.py.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import trio

from tap import state as S
from tests.support import require_root

GID = 47113  # a gid no one has: chown to it needs no /etc/group entry


@pytest.fixture(autouse=True)
def _policy():
    old = os.umask(0)
    os.umask(old)
    yield
    S.set_group(None)
    os.umask(old)


def modes(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (S_IMODE, gid) of everything under root, root included as '.'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath, name) if name != "." else Path(dirpath)
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_gid)
    return out


def _populate(d: S.StateDir) -> None:
    d.lock()
    d.init_state(1 << 20, "drive0")
    d.write_attach({"pid": os.getpid()})
    d.unlock()


def test_private_modes_whatever_the_umask(tmp_path):
    S.set_group(None)
    os.umask(0)  # the worst a caller can hand us
    d = S.StateDir(tmp_path / "new" / "deeper" / "state")
    _populate(d)
    got = modes(d.path)
    assert got == {".": (0o700, got["."][1]), "log": (0o700, got["log"][1]), "lock": (0o600, got["lock"][1]),
                   "state.json": (0o600, got["state.json"][1]), "attach.json": (0o600, got["attach.json"][1])}
    # parents we had to create only let one through (no listing of the state directories in them)
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o711


def test_group_modes_and_back(tmp_path, capsys):
    require_root()
    os.umask(0o022)
    S.set_group(str(GID))
    assert os.umask(0o027) == 0o027  # set_group set the umask for modules that are not access-aware
    d = S.StateDir(tmp_path / "state")
    _populate(d)
    (d.path / "engine").mkdir()             # what another module creates: group by setgid, mode by the umask
    fd = os.open(d.path / "engine" / "disk.img", os.O_CREAT | os.O_WRONLY, 0o640)
    os.close(fd)
    got = modes(d.path)
    for name, (mode, gid) in got.items():
        assert gid == GID, name
        assert mode == (0o2750 if (d.path / name).is_dir() else 0o640), (name, oct(mode))
    err = capsys.readouterr().err
    assert "tightened" not in err          # granting is not tightening
    assert "cannot reach" in err           # but pytest's 0700 tmp dir keeps the group out, and we say so
    # the same directory attached without --group: root's alone again, said once
    S.set_group(None)
    d.prepare()
    d.prepare()
    err = capsys.readouterr().err
    assert err.count("tightened") == 1, err
    for name, (mode, _) in modes(d.path).items():
        assert mode == (0o700 if (d.path / name).is_dir() else 0o600), (name, oct(mode))


def test_an_existing_loose_state_dir_is_tightened_at_attach(tmp_path, capsys):
    S.set_group(None)
    d = tmp_path / "old"
    (d / "log").mkdir(parents=True)
    d.chmod(0o755)
    (d / "log").chmod(0o755)
    for name in ("replica.img", "events.jsonl", "log/00000000000000000001.wlog"):
        (d / name).write_bytes(b"guest data")
        (d / name).chmod(0o644)
    (d / "link").symlink_to("/etc/hostname")   # never followed, never changed
    target_mode = os.stat("/etc/hostname").st_mode
    S.StateDir(d).lock()
    err = capsys.readouterr().err
    assert "5 entries" in err and "tightened" in err, err
    got = modes(d)
    assert got["."][0] == got["log"][0] == 0o700
    assert {got[n][0] for n in ("replica.img", "events.jsonl", "log/00000000000000000001.wlog", "lock")} == {0o600}
    assert os.stat("/etc/hostname").st_mode == target_mode


def test_a_state_dir_another_user_owns_is_refused(tmp_path):
    require_root()
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, 65534, 65534)
    with pytest.raises(S.StateError, match="belongs to uid 65534"):
        S.StateDir(d).lock()
    assert not (d / "lock").exists()


def test_the_tmp_socket_fallback_is_a_private_directory(tmp_path):
    require_root()
    deep = tmp_path / ("d" * 100) / "state"
    sock = S.socket_path(deep, "nbd.sock")
    assert sock.parent == S.fallback_socket_dir(deep) and sock.parent.parent == Path("/tmp")
    assert S.StateDir(deep).nbd_socket == sock
    try:
        # another user took the name first: refused, never used
        sock.parent.mkdir()
        os.chown(sock.parent, 65534, 65534)
        with pytest.raises(S.StateError, match="belongs to uid 65534"):
            S.prepare_socket(sock)
        sock.parent.rmdir()
        os.umask(0)
        S.prepare_socket(sock)
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        S.remove_socket(sock)
        assert not sock.parent.exists()
    finally:
        if sock.parent.exists():
            for p in sock.parent.iterdir():
                p.unlink()
            sock.parent.rmdir()


QGID = 47114  # the group QEMU runs as, another gid no one has


@pytest.mark.parametrize("group,qemu_group", [(None, None), (str(GID), None), (None, str(QGID)),
                                              (str(GID), str(QGID))])
def test_sockets_modes_before_listen(tmp_path, group, qemu_group):
    """Bound with umask 0: events.sock is --group's (0660 root:G), the writable nbd.sock never is (0600 with
    --group alone) and only --qemu-group's (0660 root:Q); a read-only reader listener is --group's."""
    if group or qemu_group:
        require_root()
    from mirrorfs.stream.server import StreamServer
    from tap.server import open_listeners

    S.set_group(group, qemu_group)
    os.umask(0)
    (tmp_path / "events.jsonl").write_bytes(b"")
    read_want = (0o600, os.getegid()) if group is None else (0o660, GID)
    nbd_want = (0o660, QGID) if qemu_group else (0o600, os.getegid())

    def mode(name: str) -> tuple[int, int]:
        st = os.lstat(tmp_path / name)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid()
        return stat.S_IMODE(st.st_mode), st.st_gid

    async def main() -> None:
        server = StreamServer(tmp_path / "events.jsonl", tmp_path / "events.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            assert mode("events.sock") == read_want
            listeners = await open_listeners([f"unix:{tmp_path / 'nbd.sock'}"])
            listeners += await open_listeners([f"unix:{tmp_path / 'reader.sock'}"], read_only=True)
            assert mode("nbd.sock") == nbd_want
            assert mode("reader.sock") == read_want
            for listener in listeners:
                await listener.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert os.umask(0) == 0  # the umask narrowed around each bind is restored


def test_a_swapped_in_symlink_is_never_followed(tmp_path):
    """A symlink to a canary at the socket's path, planted before the bind and swapped in (by a racing thread,
    as another user with write access to the directory would) between bind and the group change, again and
    again: the canary's mode and owner never change (root chmod'ing by path would have handed out /etc/shadow).
    Nothing is monkeypatched: the mode comes from the umask at bind, the group from lchown."""
    require_root()
    import threading

    S.set_group(str(GID), str(QGID))
    canary = tmp_path / "canary"
    canary.write_bytes(b"x")
    canary.chmod(0o600)
    before = os.stat(canary)
    d = tmp_path / "shared"
    d.mkdir()
    sock = d / "nbd.sock"
    sock.symlink_to(canary)   # planted before the bind: not a socket, so not removed as stale; the bind fails
    with pytest.raises(OSError):
        S.bind_socket(sock, read_only=False)
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            try:
                os.unlink(sock)
                os.symlink(canary, sock)
            except OSError:
                pass

    racer = threading.Thread(target=swapper)
    racer.start()
    outcomes: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                S.bind_socket(sock, read_only=False).close()
                outcome = "bound"
            except S.StateError:
                outcome = "replaced"   # swapped between bind and the check: refused
            except OSError:
                outcome = "in use"     # the symlink was there at bind time
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        stop.set()
        racer.join()
    assert sum(outcomes.values()) > 100, outcomes
    after = os.stat(canary)
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == \
        (0o600, before.st_uid, before.st_gid), outcomes


def test_a_listen_dir_others_control_is_refused(tmp_path):
    """`--listen unix:PATH` in a directory other users can write to (not sticky) or that another user owns:
    refused with the cause and the fix, nothing bound there."""
    require_root()
    from tap.server import open_listeners

    S.set_group(None)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    for where, why in ((loose, "writable by other users .mode 777, not sticky.*chmod \\+t"),
                       (theirs, "belongs to uid 65534")):
        with pytest.raises(S.StateError, match=f"--listen unix:{where}/r.sock: its directory {where} .*{why}"):
            trio.run(open_listeners, [f"unix:{where / 'r.sock'}"])
        assert not (where / "r.sock").exists()
    loose.chmod(0o1777)  # sticky, like /tmp: allowed
    trio.run(open_listeners, [f"unix:{loose / 'r.sock'}"])
    assert stat.S_IMODE(os.lstat(loose / "r.sock").st_mode) == 0o600


def test_qemu_group_reaching_the_state_dir_is_kept(tmp_path, capsys):
    """The note's fix for --qemu-group (o+x on the state directory: search, no listing) survives the next
    attach's tightening; anything more does not."""
    require_root()
    S.set_group(None, str(QGID))
    d = S.StateDir(tmp_path / "state")
    _populate(d)
    d.path.chmod(0o701)
    d.prepare()
    assert stat.S_IMODE(d.path.stat().st_mode) == 0o701
    assert "tightened" not in capsys.readouterr().err
    d.path.chmod(0o705)
    d.prepare()
    assert stat.S_IMODE(d.path.stat().st_mode) == 0o700
    with pytest.raises(S.StateError, match="--qemu-group no-such-group-here: no such group"):
        S.set_group(None, "no-such-group-here")


def test_redis_password_never_from_argv(tmp_path, monkeypatch):
    from mirrorfs.stream.publish import redis_password

    monkeypatch.delenv("REDISCLI_AUTH", raising=False)
    for url in ("redis://:s3cret@127.0.0.1:6379/0", "redis://user:s3cret@host/0", "rediss://:p@h:1",
                "redis://host/0?password=s3cret", "unix:///run/redis.sock?db=0&password=s3cret"):
        with pytest.raises(ValueError, match="--redis-password-file FILE, or in the REDISCLI_AUTH") as exc:
            redis_password(url)
        assert "s3cret" not in str(exc.value) and "\n" not in str(exc.value)
    assert redis_password("redis://user@host/0") is None
    monkeypatch.setenv("REDISCLI_AUTH", "from-env")
    assert redis_password("redis://host/0") == "from-env"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert redis_password("redis://host/0", f) == "from-file"  # the file wins over the environment
    f.write_text("two\nlines\n")
    with pytest.raises(ValueError, match="one line"):
        redis_password("redis://host/0", f)
    with pytest.raises(ValueError, match="No such file"):
        redis_password("redis://host/0", tmp_path / "missing")

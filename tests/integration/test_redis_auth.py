"""Redis credentials never on the command line (issue 9): a real redis-server with requirepass; publish and collect
authenticate from --redis-password-file or REDISCLI_AUTH, a password in --redis is refused with the fix named, a
wrong or missing password ends the command with that said (no endless retry), and the running publisher's argv
(/proc/PID/cmdline, ps) does not hold the password."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from inference.eventlog import EventLog
from inference.events import Mutation
from tests.redisfixture import RedisServer
from tests.support import REPO, require_tools
from tests.tapharness import MIRRORFS

pytestmark = pytest.mark.integration

PASSWORD = "pw-7f3c9e1d-not-in-argv"
N = 40


def _state(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "state.json").write_text(json.dumps({"size": 1 << 20}))
    with EventLog(d / "events.jsonl") as log:
        log.append(Mutation(seq=1 + i, time=time.time(), vm=name, kind="create", path=f"/etc/{name}-{i}")
                   for i in range(N))
    return d


def _run(*args, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*MIRRORFS, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**{k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}, **(env or {})})


@pytest.fixture
def redis_auth(tmp_path):
    require_tools("redis-server")
    import redis

    with RedisServer(tmp_path / "redis") as server:
        redis.Redis(port=server.port).config_set("requirepass", PASSWORD)
        pwfile = tmp_path / "redis.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, PASSWORD.encode() + b"\n")
        os.close(fd)
        yield server, pwfile, redis.Redis(port=server.port, password=PASSWORD)


def test_a_password_in_the_url_is_refused(tmp_path, redis_auth):
    server, _, client = redis_auth
    state = _state(tmp_path, "vm1")
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    for args in (("publish", "--state", state, "--redis", url, "--once"), ("collect", "--redis", url, "--count", "1")):
        proc = _run(*args)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--redis-password-file FILE" in lines[0] and "REDISCLI_AUTH" in lines[0], lines
        assert PASSWORD not in proc.stderr
    assert client.keys("mirrorfs:*") == []


def test_a_missing_or_wrong_password_ends_the_command(tmp_path, redis_auth):
    server, _, _ = redis_auth
    state = _state(tmp_path, "vm1")
    for env in ({}, {"REDISCLI_AUTH": "wrong"}):
        start = time.monotonic()
        proc = _run("publish", "--state", state, "--redis", server.url, "--once", env=env, timeout=30)
        assert proc.returncode == 1 and "refused us" in proc.stderr and "--redis-password-file" in proc.stderr, \
            proc.stderr
        proc = _run("collect", "--redis", server.url, "--count", "1", env=env, timeout=30)
        assert proc.returncode == 1 and "refused us" in proc.stderr, proc.stderr
        assert time.monotonic() - start < 20   # said at once, not retried with backoff


def test_publish_and_collect_with_the_file_and_the_environment(tmp_path, redis_auth):
    server, pwfile, client = redis_auth
    vm1, vm2 = _state(tmp_path, "vm1"), _state(tmp_path, "vm2")
    err = open(tmp_path / "publish.err", "wb")
    pub = subprocess.Popen([*MIRRORFS, "publish", "--state", str(vm1), "--redis", server.url,
                            "--redis-password-file", str(pwfile), "--stream", "mirrorfs:events:t:vm1"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while client.xlen("mirrorfs:events:t:vm1") < N:
            assert pub.poll() is None, (tmp_path / "publish.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # the running publisher, as every local user sees it
        cmdline = Path(f"/proc/{pub.pid}/cmdline").read_bytes()
        assert b"publish" in cmdline and PASSWORD.encode() not in cmdline
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
        assert str(pub.pid) in ps and PASSWORD not in ps
    finally:
        pub.terminate()
        pub.wait(30)
    # the second source authenticates from the environment, as redis-cli does
    proc = _run("publish", "--state", vm2, "--redis", server.url, "--stream", "mirrorfs:events:t:vm2", "--once",
                env={"REDISCLI_AUTH": PASSWORD})
    assert proc.returncode == 0, proc.stderr
    assert client.xlen("mirrorfs:events:t:vm2") == N
    # collectors: one with REDISCLI_AUTH, one (another group) with the file
    for group, how in (("g-env", {"env": {"REDISCLI_AUTH": PASSWORD}}), ("g-file", {})):
        extra = () if how else ("--redis-password-file", pwfile)
        proc = _run("collect", "--redis", server.url, "--group", group, "--json", "--count", 2 * N, "--idle-exit", 20,
                    *extra, **how)
        assert proc.returncode == 0, proc.stderr
        got = sorted(json.loads(line)["path"] for line in proc.stdout.splitlines())
        assert got == sorted(f"/etc/{vm}-{i}" for vm in ("vm1", "vm2") for i in range(N))

"""Failure paths a user hits (issue 15): each ends with one line naming the cause and the fix, a non-zero exit,
and nothing in the state directory changed; a closed pipe and a signal end quietly and at once."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from inference.events import Mutation
from tap.state import StateDir, write_json_atomic
from tests.tapharness import MIRRORFS, mirrorfs

pytestmark = pytest.mark.integration

SIGNAL_EXIT = 1.0  # seconds a signalled command may take to end (a retry waits up to 5 s: it must not)


def _state(tmp_path: Path, events: int = 5000) -> tuple[Path, bytes]:
    """A recorded state directory (sync none, from base.raw) with `events` lines in events.jsonl."""
    state = tmp_path / "state"
    sd = StateDir(state)
    sd.path.mkdir(parents=True)
    sd.init_state(1 << 20, "drive0")
    write_json_atomic(sd.attach_file, {"sync": "none", "base": str(tmp_path / "base.raw"), "detached": 1.0})
    lines = [Mutation(seq=i, time=1.0, kind="create", path=f"/f{i}", fs="disk", id=f"{i}-1").to_json()
             for i in range(1, events + 1)]
    data = ("\n".join(lines) + "\n").encode()
    (state / "events.jsonl").write_bytes(data)
    return state, data


def test_version():
    out = mirrorfs("--version").stdout
    assert out.startswith("mirrorfs ") and out.split()[1][0].isdigit(), out


def test_a_closed_pipe_ends_quietly(tmp_path):
    state, _ = _state(tmp_path)
    proc = subprocess.Popen([*MIRRORFS, "events", "--state", str(state)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    _, err = proc.communicate(timeout=60)
    assert b"/f1" in first
    assert proc.returncode == 0 and err == b"", err


def test_replay_checks_its_arguments_before_touching_the_state(tmp_path):
    state, data = _state(tmp_path)
    (tmp_path / "base.raw").write_bytes(b"\0" * (1 << 20))
    proc = mirrorfs("replay", "--state", state, "--base", tmp_path / "base.raw", "--follow", "--metrics", "bad:x:y",
                    check=False)
    assert proc.returncode == 1 and "--metrics wants HOST:PORT" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (state / "events.jsonl").read_bytes() == data, "events.jsonl was truncated by a refused replay"
    assert not (state / "events.sock").exists() and not (state / "engine").exists()

    # no base and no index for a log recorded with --sync none: the engine cannot know the disk
    proc = mirrorfs("replay", "--state", state, check=False)
    assert proc.returncode == 1 and "--base IMAGE" in proc.stderr and str(tmp_path / "base.raw") in proc.stderr
    assert (state / "events.jsonl").read_bytes() == data

    proc = mirrorfs("replay", "--state", state, "--base", tmp_path / "nope.raw", check=False)
    assert proc.returncode == 1 and "nope.raw does not exist" in proc.stderr
    assert (state / "events.jsonl").read_bytes() == data


def test_index_of_an_image_without_a_file_system_writes_nothing(tmp_path):
    image = tmp_path / "blank.img"
    image.write_bytes(b"\0" * (4 << 20))
    proc = mirrorfs("index", image, check=False)
    assert proc.returncode == 1 and "no ext2/3/4 file system" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.img"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("command", ["publish", "collect"])
def test_a_redis_retry_ends_at_once_on_a_signal(tmp_path, command, sig):
    """Redis is down (nothing listens on the port): the command retries with backoff, and a signal ends it at
    once, not after the wait. With -q its warnings are not printed."""
    state, _ = _state(tmp_path, events=3)
    args = ["publish", "--state", str(state)] if command == "publish" else ["collect"]
    quiet = sig == signal.SIGINT
    proc = subprocess.Popen([*MIRRORFS, *(["-q"] if quiet else []), *args, "--redis", "redis://127.0.0.1:1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.5)  # several retries: the backoff is up to seconds by now
        assert proc.poll() is None, proc.stderr.read()
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert took < SIGNAL_EXIT, f"{command} took {took:.1f} s to end on {sig.name}"
    assert "Traceback" not in err, err
    assert ("redis unavailable" in err) != quiet, err


def test_log_lines_carry_journald_priorities():
    import logging

    from mirrorfs.cli.main import EscapingFormatter, log_level

    rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad \x1b[31m name", None, None)
    assert EscapingFormatter("mirrorfs: %(message)s", journal=True).format(rec) == "<3>mirrorfs: bad \\033[31m name"
    assert EscapingFormatter("mirrorfs: %(message)s").format(rec) == "mirrorfs: bad \\033[31m name"
    assert log_level(0, 1) == logging.ERROR and log_level(0, 0) == logging.WARNING and log_level(2, 0) == logging.DEBUG

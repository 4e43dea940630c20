"""Followers wake on new records (inotify), not on a polling interval; the poke helper finds who watches what."""

from __future__ import annotations

import os
import threading
import time

from inference.wake import DirWake


def test_wait_returns_on_an_append_and_times_out_when_quiet(tmp_path):
    f = tmp_path / "seg"
    f.write_bytes(b"")
    with DirWake(tmp_path) as wake:
        t0 = time.monotonic()
        assert wake.wait(0.05) is False          # nothing happened: the timeout
        assert time.monotonic() - t0 >= 0.04
        threading.Timer(0.1, lambda: f.open("ab").write(b"record")).start()
        t0 = time.monotonic()
        assert wake.wait(5.0) is True            # the append ends the wait, long before the timeout
        assert time.monotonic() - t0 < 2.0
        time.sleep(0.05)                         # the writer's close comes after its write
        wake.drain()
        assert wake.wait(0.02) is False          # drained: what was seen does not wake it again


def test_wake_ends_a_wait_from_another_thread(tmp_path):
    with DirWake(tmp_path) as wake:
        threading.Timer(0.1, wake.wake).start()
        t0 = time.monotonic()
        assert wake.wait(5.0) is True
        assert time.monotonic() - t0 < 2.0


def test_rename_into_a_watched_directory_wakes(tmp_path):
    """attach.json is replaced by a rename: a detach must wake the engine."""
    from inference.wake import IN_MOVED_TO

    with DirWake() as wake:
        wake.add(tmp_path, IN_MOVED_TO)
        (tmp_path / "x.tmp").write_text("{}")
        assert wake.wait(0.05) is False          # a write is not what it waits for
        os.replace(tmp_path / "x.tmp", tmp_path / "attach.json")
        assert wake.wait(5.0) is True


class _Follower:
    """A write log as the engine loop sees it: a directory, and poll() returning what was appended."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def poll(self):
        with self.lock:
            return self.batches.pop(0) if self.batches else []


class _Engine:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.processed: list[tuple[float, list[int]]] = []

    def process(self, batch):
        self.processed.append((time.monotonic(), batch))
        return []

    def tick(self, now_ns):
        return []

    def idle_wait_s(self, now_ns):
        return 5.0  # the next clock-judged decision is far away

    def finish(self):
        return []


def test_runner_wakes_on_a_new_record_not_on_its_idle_tick(tmp_path):
    """With the engine's next decision 5 s away, a record appended while the loop sleeps is processed at once."""
    from inference.runner import Runner

    follower, engine = _Follower(tmp_path), _Engine()
    loop = Runner(engine, follower, follow=True)
    loop.thread.start()
    try:
        time.sleep(0.3)  # the loop is asleep in its first idle wait
        with follower.lock:
            follower.batches.append([1])
        t0 = time.monotonic()
        (tmp_path / "0000000001.log").write_bytes(b"record")  # what the tap's writev does to the directory
        deadline = time.monotonic() + 4
        while not engine.processed and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.processed, "the loop slept through the new record"
        assert engine.processed[0][0] - t0 < 1.0
    finally:
        loop.halt()
        loop.thread.join(10)
    assert not loop.thread.is_alive(), "halt() must end the idle wait"


def test_inotify_watchers_names_the_instance_watching_a_directory(tmp_path):
    from mirrorfs.view.poke import inotify_watchers

    (tmp_path / "sub").mkdir()
    st, sub = os.stat(tmp_path), os.stat(tmp_path / "sub")
    with DirWake(tmp_path) as wake:
        mine = {w for w in inotify_watchers(st.st_dev, st.st_ino) if w[0] == os.getpid()}
        assert mine == {(os.getpid(), wake._fd)}
        assert not {w for w in inotify_watchers(sub.st_dev, sub.st_ino) if w[0] == os.getpid()}

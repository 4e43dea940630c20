"""The one loop that drives an engine over a write log: `replay`, `replay --follow` (what `attach` starts) and
`mount` all run it (docs/ARCHITECTURE.md "One clock").

It wakes on the log, never on a fixed interval: inotify on the log directory (a record appended), on the state
directory (attach.json renamed: a detach), `halt()`, or the engine's next record-time deadline. On an idle log it
hands the engine its own clock less GRACE_NS: the tap stamps a record (time.time_ns()) just before it appends
it, so by then every record stamped earlier is in the log, and a deadline is decided after exactly the records a
replay of the same log decides it after.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from inference.eventlog import gap_event
from inference.events import Mutation
from inference.wake import IN_MOVED_TO, DirWake
from tap.writelog import Gap

log = logging.getLogger("mirrorfs.runner")

CHUNK = 64  # records per engine step: the lock is released between steps (a view's reads wait for it)
GRACE_NS = 5_000_000  # how far the live clock trails the wall clock: more than a record's stamp-to-append time

Sink = Callable[[list[Mutation]], None]


class Runner:
    """Feeds the log's records through `engine` and every batch of mutations to `sinks`.

    `follow`: go on as records come until `finished()` (the attach detached) or `halt()`; either way the log is
    drained and the engine finished at the end. The engine's lock is held for each step (readers in other
    threads take it too); `locked` hooks run under it after each step, before any sink sees the step's events
    (a view's reads: mirrorfs reads.PointReads.noted)."""

    def __init__(self, engine, follower, *, follow: bool,
                 finished: Callable[[], bool] | None = None, watch: tuple[Path, ...] = (),
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.engine, self.follower, self.follow = engine, follower, follow
        self.lock = engine.lock
        self.finished = finished or (lambda: False)
        self.watch, self.clock = watch, clock
        self.sinks: list[Sink] = []
        self.locked: list[Sink] = []
        self.on_batch: Callable[[int], None] | None = None  # after each batch, with its last seq (progress)
        self.before_poll: Callable[[], None] | None = None  # e.g. the engine's scope from the subscribers
        self.on_exit: Callable[[], None] | None = None  # run_thread's end, however it ended
        self.on_segment: Callable[[int], None] | None = None  # the follower moved to a segment (retention waits)
        self._segment = -1
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.wake: DirWake | None = None
        self.thread = threading.Thread(target=self._run_thread, name="mirrorfs-engine", daemon=True)

    def halt(self) -> None:
        """Stop following (any thread, a signal handler too): what is logged is drained, then the engine finishes."""
        self.stop.set()
        if self.wake is not None:
            self.wake.wake()

    def emit(self, events: list[Mutation]) -> None:
        if events:
            for sink in self.sinks:
                sink(events)

    def _step(self, decide: Callable[[], list[Mutation]]) -> None:
        with self.lock:
            events = decide()
            for hook in self.locked:
                hook(events)
        self.emit(events)

    def _process(self, batch: list) -> list[Mutation]:
        if type(batch[0]) is Gap:  # lost seqs: an error event, and the engine goes on
            return [gap_event(batch[0], vm=self.engine.vm, time_ns=self.engine.last_time_ns)]
        return self.engine.process(batch)

    def _feed(self, batch: list) -> None:
        for i in range(0, len(batch), CHUNK):
            self._step(lambda part=batch[i:i + CHUNK]: self._process(part))
        if self.on_batch is not None:
            self.on_batch(batch[-1].seq)
        if self.on_segment is not None and self.follower.position[0] != self._segment:
            self._segment = self.follower.position[0]
            self.on_segment(self._segment)

    def catch_up(self) -> None:
        """Everything logged so far (a view is then built from the engine's tree)."""
        while batch := self.follower.poll():
            self._feed(batch)

    def run(self) -> None:
        """Follow (or just drain) the log, then finish: the engine's end-of-log events go out too."""
        try:
            if self.follow:
                self.wake = DirWake(self.follower.directory)
                for d in self.watch:
                    self.wake.add(d, IN_MOVED_TO)  # attach.json is replaced by a rename
            while self.follow and not self.stop.is_set():
                if self.before_poll is not None:
                    self.before_poll()
                if batch := self.follower.poll():
                    self._feed(batch)
                    continue
                if self.finished():
                    break
                now = self.clock() - GRACE_NS  # read after the poll: see the module's docstring
                self._step(lambda now=now: self.engine.tick(now))
                self.wake.wait(self.engine.idle_wait_s(self.clock() - GRACE_NS))
            self.catch_up()
            self._step(self.engine.finish)
        finally:
            if self.wake is not None:
                self.wake.close()

    def _run_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # noqa: BLE001 - the thread's owner re-raises it
            self.error = exc
            log.exception("inference engine failed")
        finally:
            if self.on_exit is not None:
                self.on_exit()

"""What a live engine (`mirrorfs replay --follow`) serves besides the event log: the subscription socket and
the metrics endpoint. Kept out of the engine loop (inference.runner), which only calls `observe` and `close`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from inference.events import Mutation

log = logging.getLogger("mirrorfs.live")


class LiveServices:
    def __init__(self, state_dir: Path, engine, follower, *, subscribe: bool = True,
                 metrics_addr: str | None = None) -> None:
        from mirrorfs.stream.metrics import EngineMetrics, MetricsServer
        from mirrorfs.stream.server import BackgroundServer

        self.metrics = EngineMetrics(state_dir, engine, follower)
        self.stream: BackgroundServer | None = None
        self.http: MetricsServer | None = None
        if subscribe:
            try:
                self.stream = BackgroundServer(state_dir).start()
                srv = self.stream.server
                self.metrics.subscribers = lambda: {"subscribers": len(srv.subscribers), **srv.counters}
                print(f"mirrorfs: subscribers: {srv.socket_path}", file=sys.stderr, flush=True)
            except OSError as exc:
                log.warning("%s; going on without the subscription socket", exc)
        if metrics_addr:
            self.http = MetricsServer(metrics_addr, self.metrics.render)
            host, port = self.http.address[:2]
            print(f"mirrorfs: metrics on http://{host}:{port}/metrics", file=sys.stderr, flush=True)

    @property
    def scope(self) -> tuple[str, ...] | None:
        """Where subscribers' path filters can match (None: anywhere or no subscribers)."""
        return self.stream.scope if self.stream else None

    def observe(self, events: Iterable[Mutation]) -> None:
        self.metrics.observe(events)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.stream is not None:
            self.stream.stop()


class _NoServices:
    scope = None

    def close(self) -> None:
        pass


def start_live(args, state_dir: Path, engine, follower, events) -> LiveServices | _NoServices:
    """For `replay`: with --follow, serve subscribers and (with --metrics) metrics, fed by the event log."""
    if not getattr(args, "follow", False):
        return _NoServices()
    live = LiveServices(state_dir, engine, follower, metrics_addr=getattr(args, "metrics", None))
    events.listeners.append(live.observe)
    return live

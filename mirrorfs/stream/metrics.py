"""Prometheus text metrics for a live engine (`--metrics ADDR` on attach and replay).

The engine process knows everything an operator asks first: how far behind the write log it is (records,
bytes, seconds), what it emits (events by kind, per second), what waits (unowned blocks), and what went wrong.
Served by the standard library's HTTP server on a thread: a scrape reads counters, it never blocks the engine.
"""

from __future__ import annotations

import collections
import http.server
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tap.state import read_json
from tap.writelog import list_segments, segment_name

RATE_WINDOW = 60.0  # seconds over which events/s is averaged


def parse_addr(addr: str) -> tuple[str, int]:
    """HOST:PORT, :PORT or tcp:HOST:PORT (default host 127.0.0.1: metrics are not for the whole network)."""
    text = addr.removeprefix("tcp:")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics wants HOST:PORT or :PORT, not {addr!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def log_bytes(log_dir: Path) -> tuple[int, dict[int, int]]:
    """Total bytes of the write log's segments, and each segment's size by its first seq."""
    sizes: dict[int, int] = {}
    for first in list_segments(log_dir):
        try:
            sizes[first] = (log_dir / segment_name(first)).stat().st_size
        except FileNotFoundError:
            continue
    return sum(sizes.values()), sizes


class EngineMetrics:
    """Counters fed by the engine loop (observe) and read by scrapes (render)."""

    def __init__(self, state_dir: Path, engine, follower) -> None:
        self.state_dir = Path(state_dir)
        self.engine, self.follower = engine, follower
        self.by_kind: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, str]] = collections.deque()
        self._lock = threading.Lock()
        self.subscribers: Callable[[], dict[str, int]] | None = None
        self.reads = None  # the mounted view's mirrorfs.view.reads.PointReads (attach --mount), else None
        self.started = time.time()

    def observe(self, events: Iterable) -> None:
        now = time.monotonic()
        with self._lock:
            for e in events:
                self.by_kind[e.kind] += 1
                self._recent.append((now, e.kind))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def render(self) -> str:
        st = self.engine.stats()  # one consistent copy, under the engine's lock
        eng_seq, eng_time_ns = st.last_seq, st.last_time_ns
        attach = read_json(self.state_dir / "attach.json") or {}
        log_seq = max(int(attach.get("last_seq") or 0), eng_seq)
        lag_records = max(log_seq - eng_seq, 0)
        total, sizes = log_bytes(self.state_dir / "log")
        seg, off = self.follower.position
        done = sum(size for first, size in sizes.items() if first < seg) + off
        lag_bytes = max(total - done, 0)
        lag_seconds = max(time.time() - eng_time_ns / 1e9, 0.0) if lag_records and eng_time_ns else 0.0
        now = time.monotonic()
        with self._lock:
            by_kind = dict(self.by_kind)
            window = collections.Counter(k for t, k in self._recent if t >= now - RATE_WINDOW)
        span = min(RATE_WINDOW, max(time.time() - self.started, 1e-3))
        out = [
            "# HELP mirrorfs_log_last_seq Seq of the newest record in the write log (attach.json, or the engine's).",
            "# TYPE mirrorfs_log_last_seq gauge", f"mirrorfs_log_last_seq {log_seq}",
            "# HELP mirrorfs_engine_last_seq Seq of the last record the inference engine processed.",
            "# TYPE mirrorfs_engine_last_seq gauge", f"mirrorfs_engine_last_seq {eng_seq}",
            "# HELP mirrorfs_lag_records Write-log records not yet processed by the engine.",
            "# TYPE mirrorfs_lag_records gauge", f"mirrorfs_lag_records {lag_records}",
            "# HELP mirrorfs_lag_bytes Write-log bytes not yet processed by the engine.",
            "# TYPE mirrorfs_lag_bytes gauge", f"mirrorfs_lag_bytes {lag_bytes}",
            "# HELP mirrorfs_lag_seconds Age of the last processed record while records wait (0 when caught up).",
            "# TYPE mirrorfs_lag_seconds gauge", f"mirrorfs_lag_seconds {lag_seconds:.3f}",
            "# HELP mirrorfs_log_bytes Size of the write log on disk.",
            "# TYPE mirrorfs_log_bytes gauge", f"mirrorfs_log_bytes {total}",
            "# HELP mirrorfs_events_total Mutation events emitted, by kind.",
            "# TYPE mirrorfs_events_total counter",
            *(f'mirrorfs_events_total{{kind="{k}"}} {n}' for k, n in sorted(by_kind.items())),
            f"# HELP mirrorfs_events_per_second Mutation events per second over the last {RATE_WINDOW:.0f} s.",
            "# TYPE mirrorfs_events_per_second gauge",
            *(f'mirrorfs_events_per_second{{kind="{k}"}} {n / span:.3f}' for k, n in sorted(window.items())),
            "# HELP mirrorfs_unowned_blocks_total Data blocks written before any inode owned them (delayed alloc).",
            "# TYPE mirrorfs_unowned_blocks_total counter",
            f"mirrorfs_unowned_blocks_total {st.unowned_blocks}",
            "# HELP mirrorfs_pending_data_inodes Inodes with data writes waiting for their consistency point.",
            "# TYPE mirrorfs_pending_data_inodes gauge",
            f"mirrorfs_pending_data_inodes {st.pending_data_inodes}",
            "# HELP mirrorfs_errors_total Error events (hostile or inconsistent metadata) by the engine.",
            "# TYPE mirrorfs_errors_total counter", f"mirrorfs_errors_total {st.errors}",
            "# HELP mirrorfs_journal_transactions_total jbd2 transactions applied.",
            "# TYPE mirrorfs_journal_transactions_total counter",
            f"mirrorfs_journal_transactions_total {st.transactions}",
            "# HELP mirrorfs_journal_gaps_total Journal gaps reconciled from home locations.",
            "# TYPE mirrorfs_journal_gaps_total counter", f"mirrorfs_journal_gaps_total {st.gaps}",
            "# HELP mirrorfs_engine_scope_prefixes Path prefixes the engine attributes file data under (0: all).",
            "# TYPE mirrorfs_engine_scope_prefixes gauge",
            f"mirrorfs_engine_scope_prefixes {st.scope_prefixes}",
            "# HELP mirrorfs_engine_skipped_data_total Data writes outside the engine's scope, not attributed.",
            "# TYPE mirrorfs_engine_skipped_data_total counter",
            f"mirrorfs_engine_skipped_data_total {st.skipped_data}",
        ]
        if self.reads is not None:
            errors, waits = dict(self.reads.errors), self.reads.waits
            out += ["# HELP mirrorfs_view_read_errors_total Reads of the mounted view answered EIO instead of bytes "
                    "(short: the engine lacks bytes the view shows; behind: the view never reached the engine's "
                    "version). Never padded.",
                    "# TYPE mirrorfs_view_read_errors_total counter",
                    *(f'mirrorfs_view_read_errors_total{{reason="{k}"}} {errors.get(k, 0)}'
                      for k in sorted({"short", "behind", *errors})),
                    "# HELP mirrorfs_view_read_waits_total Reads of the mounted view that waited for the view to "
                    "apply their file's events (the engine was ahead).",
                    "# TYPE mirrorfs_view_read_waits_total counter", f"mirrorfs_view_read_waits_total {waits}"]
        if self.subscribers is not None:
            subs = self.subscribers()
            out += ["# HELP mirrorfs_subscribers Connected subscribers of the event socket.",
                    "# TYPE mirrorfs_subscribers gauge", f"mirrorfs_subscribers {subs.get('subscribers', 0)}",
                    "# HELP mirrorfs_subscriber_lagged_total Times a subscriber's buffer filled (sent to catch-up).",
                    "# TYPE mirrorfs_subscriber_lagged_total counter",
                    f"mirrorfs_subscriber_lagged_total {subs.get('lagged', 0)}",
                    "# HELP mirrorfs_subscriber_errors_total Subscriber requests refused (malformed, oversize).",
                    "# TYPE mirrorfs_subscriber_errors_total counter",
                    f"mirrorfs_subscriber_errors_total {subs.get('errors', 0)}"]
        return "\n".join(out) + "\n"


class MetricsServer:
    """GET /metrics (or /) on a thread; anything else is 404."""

    def __init__(self, addr: str, render: Callable[[], str]) -> None:
        render_fn = render

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path not in ("/", "/metrics"):
                    self.send_error(404)
                    return
                body = render_fn().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(parse_addr(addr), Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="mirrorfs-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

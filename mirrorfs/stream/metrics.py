"""Prometheus text metrics for a live engine (`--metrics ADDR` on attach and replay).

The engine process knows everything an operator asks first: how far behind the write log it is (records,
bytes, seconds), what it emits (events by kind, per second), what waits (unowned blocks), and what went wrong.
Built with prometheus_client (our families from a custom collector, plus its process metrics), served by the
standard library's HTTP server on a thread: a scrape reads counters and takes the engine's lock only for
Engine.stats(), a copy.
"""

from __future__ import annotations

import collections
import http.server
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

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
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.registry.register(self)

    def observe(self, events: Iterable) -> None:
        now = time.monotonic()
        with self._lock:
            for e in events:
                self.by_kind[e.kind] += 1
                self._recent.append((now, e.kind))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def collect(self) -> Iterator:
        """The metric families of one scrape (prometheus_client calls this; see render)."""
        st = self.engine.stats()  # one consistent copy, under the engine's lock
        eng_seq, eng_time_ns = st.last_seq, st.last_time_ns
        attach = read_json(self.state_dir / "attach.json") or {}
        log_seq = max(int(attach.get("last_seq") or 0), eng_seq)
        lag_records = max(log_seq - eng_seq, 0)
        total, sizes = log_bytes(self.state_dir / "log")
        seg, off = self.follower.position
        done = sum(size for first, size in sizes.items() if first < seg) + off
        lag_seconds = max(time.time() - eng_time_ns / 1e9, 0.0) if lag_records and eng_time_ns else 0.0
        now = time.monotonic()
        with self._lock:
            by_kind = dict(self.by_kind)
            window = collections.Counter(k for t, k in self._recent if t >= now - RATE_WINDOW)
        span = min(RATE_WINDOW, max(time.time() - self.started, 1e-3))

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("mirrorfs_log_last_seq", "Seq of the newest record in the write log (attach.json, or the "
                    "engine's).", log_seq)
        yield gauge("mirrorfs_engine_last_seq", "Seq of the last record the inference engine processed.", eng_seq)
        yield gauge("mirrorfs_lag_records", "Write-log records not yet processed by the engine.", lag_records)
        yield gauge("mirrorfs_lag_bytes", "Write-log bytes not yet processed by the engine.", max(total - done, 0))
        yield gauge("mirrorfs_lag_seconds", "Age of the last processed record while records wait (0 when caught "
                    "up).", round(lag_seconds, 3))
        yield gauge("mirrorfs_log_bytes", "Size of the write log on disk.", total)
        running = bool(attach) and not attach.get("detached")
        yield gauge("mirrorfs_attach_running", "1 while the attach that records this disk runs (not detached).",
                    int(running))
        ready = running and bool(attach.get("ready"))
        yield gauge("mirrorfs_mirror_job_ready", "1 once QEMU's mirror job is ready (every write reaches the "
                    "tap), 0 before (the initial copy) and after the detach.", int(ready))
        # an attach holds its QMP connection for its whole life and ends when it loses it (tap.attach)
        yield gauge("mirrorfs_qmp_connected", "1 while the attach holds its QMP connection to QEMU.", int(running))
        events = CounterMetricFamily("mirrorfs_events", "Mutation events emitted, by kind.", labels=["kind"])
        for k, n in sorted(by_kind.items()):
            events.add_metric([k], n)
        yield events
        rate = GaugeMetricFamily("mirrorfs_events_per_second", f"Mutation events per second over the last "
                                 f"{RATE_WINDOW:.0f} s.", labels=["kind"])
        for k, n in sorted(window.items()):
            rate.add_metric([k], round(n / span, 3))
        yield rate
        yield counter("mirrorfs_unowned_blocks", "Data blocks written before any inode owned them (delayed "
                      "alloc).", st.unowned_blocks)
        yield gauge("mirrorfs_pending_data_inodes", "Inodes with data writes waiting for their consistency point.",
                    st.pending_data_inodes)
        yield counter("mirrorfs_errors", "Error events (hostile or inconsistent metadata) by the engine.", st.errors)
        yield counter("mirrorfs_journal_transactions", "jbd2 transactions applied.", st.transactions)
        yield counter("mirrorfs_journal_gaps", "Journal gaps reconciled from home locations.", st.gaps)
        yield gauge("mirrorfs_engine_scope_prefixes", "Path prefixes the engine attributes file data under (0: all).",
                    st.scope_prefixes)
        yield counter("mirrorfs_engine_skipped_data", "Data writes outside the engine's scope, not attributed.",
                      st.skipped_data)
        latency = attach.get("write_latency")  # the tap's, when it reports one: {"buckets": [[le, n]...], "sum"}
        if isinstance(latency, dict) and isinstance(latency.get("buckets"), list):
            try:
                buckets = [(str(le), float(n)) for le, n in latency["buckets"]]
                yield HistogramMetricFamily("mirrorfs_tap_write_latency_seconds", "Time from a guest write's "
                                            "arrival at the tap to its reply.", buckets=buckets,
                                            sum_value=float(latency.get("sum", 0)))
            except (TypeError, ValueError):
                pass  # an attach.json from another version: no histogram rather than a failed scrape
        if self.reads is not None:
            errors, waits = dict(self.reads.errors), self.reads.waits
            eio = CounterMetricFamily("mirrorfs_view_read_errors", "Reads of the mounted view answered EIO "
                                      "instead of bytes (short: the engine lacks bytes the view shows; behind: the "
                                      "view never reached the engine's version). Never padded.", labels=["reason"])
            for k in sorted({"short", "behind", *errors}):
                eio.add_metric([k], errors.get(k, 0))
            yield eio
            yield counter("mirrorfs_view_read_waits", "Reads of the mounted view that waited for the view to apply "
                          "their file's events (the engine was ahead).", waits)
        if self.subscribers is not None:
            subs = self.subscribers()
            yield gauge("mirrorfs_subscribers", "Connected subscribers of the event socket.",
                        subs.get("subscribers", 0))
            yield counter("mirrorfs_subscriber_lagged", "Times a subscriber's buffer filled (sent to catch-up).",
                          subs.get("lagged", 0))
            yield counter("mirrorfs_subscriber_errors", "Subscriber requests refused (malformed, oversize).",
                          subs.get("errors", 0))

    def render(self) -> str:
        """One scrape in the Prometheus text format: ours, plus the process's own (CPU, memory, fds)."""
        return generate_latest(self.registry).decode()


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

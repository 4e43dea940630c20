"""The metrics endpoint's families (prometheus_client): the process's own, the engine's lag, the mirror job's
state from attach.json, events by kind, and the tap's write-latency histogram when attach.json carries one."""

from __future__ import annotations

import json
from types import SimpleNamespace

from inference.engine import EngineStats
from mirrorfs.stream.metrics import EngineMetrics


def _scrape(tmp_path, attach: dict, last_seq: int = 40) -> dict[str, float]:
    (tmp_path / "attach.json").write_text(json.dumps(attach))
    st = EngineStats(**{f: 0 for f in EngineStats.__slots__} | {"last_seq": last_seq, "last_time_ns": 10**18})
    m = EngineMetrics(tmp_path, SimpleNamespace(stats=lambda: st), SimpleNamespace(position=(0, 0)))
    m.observe([SimpleNamespace(kind="create"), SimpleNamespace(kind="create"), SimpleNamespace(kind="modify")])
    out = {}
    for line in m.render().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_engine_lag_job_state_events_and_process(tmp_path):
    m = _scrape(tmp_path, {"last_seq": 50, "ready": True, "pid": 1})
    assert m["mirrorfs_log_last_seq"] == 50 and m["mirrorfs_engine_last_seq"] == 40
    assert m["mirrorfs_lag_records"] == 10 and m["mirrorfs_lag_seconds"] > 0
    assert m["mirrorfs_mirror_job_ready"] == 1 and m["mirrorfs_attach_running"] == 1
    assert m['mirrorfs_events_total{kind="create"}'] == 2 and m['mirrorfs_events_total{kind="modify"}'] == 1
    assert m["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in m
    detached = _scrape(tmp_path, {"last_seq": 40, "ready": True, "detached": 1.0})
    assert detached["mirrorfs_mirror_job_ready"] == 0 and detached["mirrorfs_qmp_connected"] == 0
    assert detached["mirrorfs_lag_records"] == 0 and detached["mirrorfs_lag_seconds"] == 0


def test_tap_write_latency_histogram_from_attach_json(tmp_path):
    hist = {"buckets": [[0.00005, 3], [0.0001, 7], ["+Inf", 9]], "sum": 0.0009}
    m = _scrape(tmp_path, {"last_seq": 40, "ready": True, "write_latency": hist})
    assert m['mirrorfs_tap_write_latency_seconds_bucket{le="0.0001"}'] == 7
    assert m["mirrorfs_tap_write_latency_seconds_count"] == 9
    bad = _scrape(tmp_path, {"last_seq": 40, "write_latency": {"buckets": [["x", "y"]]}})  # never a failed scrape
    assert not [k for k in bad if k.startswith("mirrorfs_tap_write_latency")]


def test_the_taps_latency_buckets_are_cumulative_and_count_every_write():
    from tap.server import LATENCY_BOUNDS_NS, TapStats

    stats = TapStats()
    stats.observe(30_000, 2)             # two writes of one receive, 30 µs
    stats.observe(10**9, 1)              # one behind a slow fsync: past the last bound
    hist = stats.latency()
    assert len(hist["buckets"]) == len(LATENCY_BOUNDS_NS) + 1
    assert hist["buckets"][0] == [25e-6, 0] and hist["buckets"][1] == [50e-6, 2]
    assert hist["buckets"][-1] == ["+Inf", 3] and abs(hist["sum"] - (2 * 30e-6 + 1.0)) < 1e-9

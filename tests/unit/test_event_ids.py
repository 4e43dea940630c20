"""Event ids (SEQ-N): stable positions for resume and dedupe, kept across a reopen of the event log."""

from __future__ import annotations

import json

from inference.eventlog import EventLog, EventTail, last_position, read_events
from inference.events import Mutation, parse_id
from mirrorfs.stream.publish import Publisher


def ev(seq: int, path: str = "/a") -> Mutation:
    return Mutation(seq=seq, time=1.0, kind="create", path=path)


def test_ids_number_events_within_a_seq(tmp_path):
    p = tmp_path / "events.jsonl"
    with EventLog(p, truncate=True) as log:
        log.append([ev(5), ev(5), ev(7)])
        log.append([ev(7), ev(9)])   # a tick stamped with the last record's seq continues its numbering
    ids = [json.loads(x)["id"] for x in p.read_text().splitlines()]
    assert ids == ["5-1", "5-2", "7-1", "7-2", "9-1"]
    assert last_position(p) == (9, 1)
    with EventLog(p) as log:        # reopened for appending: numbering goes on
        log.append([ev(9), ev(10)])
    assert [e.id for e in read_events(p)][-2:] == ["9-2", "10-1"]
    assert [e.id for e in read_events(p, after=(7, 2))] == ["9-1", "9-2", "10-1"]
    assert Mutation.from_json(p.read_text().splitlines()[0]).position == (5, 1)


def test_tail_returns_complete_lines_and_notices_a_rewrite(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_bytes(b'{"a":1}\n{"b"')
    tail = EventTail(p)
    assert [line for _, line in tail.poll()] == [b'{"a":1}']
    with open(p, "ab") as f:
        f.write(b':2}\n')
    assert [line for _, line in tail.poll()] == [b'{"b":2}']
    assert tail.offset == p.stat().st_size
    p.write_bytes(b'{"c":3}\n')  # shorter: rewritten
    assert [line for _, line in tail.poll()] == [b'{"c":3}'] and tail.restarted


def test_publisher_skips_published_and_filtered(tmp_path):
    from mirrorfs.stream.filters import Filter

    (tmp_path / "events.jsonl").touch()
    pub = Publisher(tmp_path, "redis://127.0.0.1:1/0", flt=Filter.make(paths=["/etc/**"]))
    pub.after = parse_id("5-2")
    lines = [(0, json.dumps({"id": i, "seq": int(i.split("-")[0]), "kind": "create", "path": p}).encode())
             for i, p in [("5-1", "/etc/a"), ("5-2", "/etc/b"), ("5-3", "/etc/c"), ("6-1", "/tmp/x"),
                          ("7-1", "/etc/d")]]
    assert [i for i, _ in pub._prepare(lines)] == ["5-3", "7-1"]
    assert pub.stats["filtered"] == 1

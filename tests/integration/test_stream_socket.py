"""The subscription socket against a growing event log: hostile requests, resume, and a subscriber that stops
reading (bounded buffer, lagged notice, catch-up from the log with no gap and no repeat)."""

from __future__ import annotations

import json
import time

import trio

from inference.eventlog import EventLog
from inference.events import Mutation
from mirrorfs.stream.filters import Filter
from mirrorfs.stream.server import StreamServer, subscribe


def _events(n: int, start: int = 1) -> list[Mutation]:
    return [Mutation(seq=start + i // 2, time=1.0, kind="create" if i % 3 else "modify",
                     path=f"/etc/f{i}" if i % 2 else f"/work/f{i}") for i in range(n)]


async def _lines(stream, n: int, timeout: float = 20) -> list[dict]:
    out: list[dict] = []
    buf = b""
    with trio.fail_after(timeout):
        while len(out) < n:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            out += [json.loads(x) for x in done if x]
    return out


def test_hostile_requests_get_an_error_and_the_server_goes_on(tmp_path):
    log_path = tmp_path / "events.jsonl"
    with EventLog(log_path, truncate=True) as log:
        log.append(_events(10))
    server = StreamServer(log_path, tmp_path / "events.sock")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            bad = [b"not json\n", b"[1,2]\n", b'{"filter": {"paths": ["etc"]}}\n',
                   b'{"filter": {"kinds": ["boom"]}}\n', b'{"after": 5}\n', b'{"what": 1}\n',
                   json.dumps({"filter": {"paths": ["/" + "x" * 9000]}}).encode() + b"\n",
                   b"x" * 40000]
            for req in bad:
                s = await trio.open_unix_socket(str(tmp_path / "events.sock"))
                try:
                    await s.send_all(req)
                except trio.BrokenResourceError:
                    pass
                reply = await _lines(s, 1)
                assert reply and "error" in reply[0], (req[:40], reply)
                await s.aclose()
            assert server.counters["errors"] == len(bad)
            good = await subscribe(tmp_path / "events.sock", Filter.make(paths=["/etc/**"]), after="0-0")
            got = await _lines(good, 6)
            assert "ok" in got[0]
            assert [e["path"] for e in got[1:]] == [f"/etc/f{i}" for i in range(1, 10, 2)]
            await good.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_subscriber_that_stops_reading_never_holds_up_the_writer(tmp_path):
    """The writer appends 20,000 events while one subscriber reads nothing: appends stay fast, the server
    buffers at most its bound, and when the subscriber reads again it gets `lagged`, then every /etc event
    exactly once, in order."""
    log_path = tmp_path / "events.jsonl"
    log = EventLog(log_path, truncate=True)
    server = StreamServer(log_path, tmp_path / "events.sock", buffer=256)
    total = 20000
    evs = _events(total)
    want = [e for e in evs if e.path.startswith("/etc/")]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            sub = await subscribe(tmp_path / "events.sock", Filter.make(paths=["/etc/**"]))
            hello = await _lines(sub, 1)
            assert "ok" in hello[0]
            worst = 0.0
            peak = 0
            for i in range(0, total, 500):
                t = time.monotonic()
                log.append(evs[i:i + 500])
                worst = max(worst, time.monotonic() - t)
                await trio.sleep(0.02)
                for s in server.subscribers:
                    peak = max(peak, s.send.statistics().current_buffer_used)
            await trio.sleep(0.5)
            assert worst < 0.5
            assert peak <= 256
            assert server.counters["lagged"] >= 1
            got = await _lines(sub, len(want) + 1, timeout=60)
            notes = [x for x in got if "lagged" in x]
            events = [x for x in got if "id" in x]
            assert notes, "the subscriber was not told it lagged"
            assert [e["id"] for e in events] == [e.id for e in want]
            await sub.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    log.close()

"""The central monitoring agent: the mutation streams of many hosts and VMs, through one consumer group.

Streams are found in the registry set the publishers SADD into and by a key pattern (SCAN), re-checked every
few seconds, so new VMs appear without a restart. XREADGROUP hands out each stream's entries in ID order, and
an entry's ID is its event id (SEQ-N), so output is in seq order per VM. The collector keeps, in Redis, the
last id it handled per stream (hash mirrorfs:collect:GROUP:done, written with the XACK in one round trip):
entries re-delivered after a collector restart (pending, never acked) or a Redis failover at or below that
mark are acked and not output again. Filtering at this layer is the same Filter as everywhere else.

Diffs (`publish --diff` puts `diff` or `diff_skipped` in events) are shown only with `--diff`: without it they are
left out of every output (a diff is many lines, and MIRRORFS_EVENT is one environment string, at most 128 KiB).

`--exec CMD` runs CMD (split with shlex, never given to a shell) with the event's path as the last argument and
the event's JSON in MIRRORFS_EVENT; a guest path always starts with "/", so it can never pass for an option.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from inference.events import Mutation, event_json, parse_id
from inference.names import escape_name
from mirrorfs.stream.filters import Filter
from mirrorfs.stream.publish import DEFAULT_REGISTRY, Backoff, Halted, auth_failed

log = logging.getLogger("mirrorfs.collect")

DIFF_FIELDS = ("diff", "diff_skipped")
DISCOVER_EVERY = 2.0
READ_COUNT = 500
BLOCK_MS = 500


def done_key(group: str) -> str:
    return f"mirrorfs:collect:{group}:done"


class Collector:
    def __init__(self, url: str, *, group: str = "mirrorfs", consumer: str | None = None,
                 registry: str = DEFAULT_REGISTRY, pattern: str = "mirrorfs:events:*", flt: Filter | None = None,
                 start: str = "begin", password: str | None = None) -> None:
        import redis

        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                          **({"password": password} if password else {}))
        self.group, self.consumer = group, consumer or socket.gethostname()
        self.registry, self.pattern = registry, pattern
        self.filter = flt or Filter()
        self.start_id = "0" if start == "begin" else "$"
        self.streams: dict[str, str] = {}          # stream -> next id to read ("0": own pending first, then ">")
        self.done: dict[str, tuple[int, int]] = {}  # stream -> last handled event position
        self._last_discover = 0.0
        self.stats = {"handled": 0, "matched": 0, "duplicates": 0, "reconnects": 0, "bytes": 0}

    # -- streams

    def discover(self) -> None:
        names = {m.decode() for m in self.redis.smembers(self.registry)}
        if self.pattern:
            for key in self.redis.scan_iter(match=self.pattern, count=1000, _type="STREAM"):
                names.add(key.decode())
        done = self.redis.hgetall(done_key(self.group))
        for k, v in done.items():
            self.done.setdefault(k.decode(), parse_id(v.decode()))
        for name in sorted(names - set(self.streams)):
            try:
                self.redis.xgroup_create(name, self.group, id=self.start_id, mkstream=True)
            except Exception as exc:  # BUSYGROUP: the group exists, which is the usual case
                if "BUSYGROUP" not in str(exc):
                    raise
            self.streams[name] = "0"  # first our own pending entries (a restart), then new ones
        self._last_discover = time.monotonic()

    # -- one batch

    def read(self) -> list[tuple[str, list[tuple[bytes, dict]]]]:
        if time.monotonic() - self._last_discover > DISCOVER_EVERY or not self.streams:
            self.discover()
        if not self.streams:
            time.sleep(BLOCK_MS / 1000)
            return []
        pending = {s: i for s, i in self.streams.items() if i != ">"}
        if pending:
            reply = self.redis.xreadgroup(self.group, self.consumer, pending, count=READ_COUNT)
            got = []
            for n, entries in reply or []:
                name = n.decode()
                if entries:
                    self.streams[name] = entries[-1][0].decode()   # go on through the pending list
                    got.append((name, entries))
            for name in pending:
                if not any(g == name for g, _ in got):
                    self.streams[name] = ">"                         # pending done: new entries from now on
            if got:
                return got
        reply = self.redis.xreadgroup(self.group, self.consumer, {s: ">" for s in self.streams},
                                      count=READ_COUNT, block=BLOCK_MS)
        return [(n.decode(), e) for n, e in reply or [] if e]

    def handle(self, batch: list[tuple[str, list[tuple[bytes, dict]]]], emit) -> int:
        """Output matching, not yet handled entries in order; then XACK them and move the done mark, in one
        round trip. Returns how many matched."""
        matched = 0
        pipe = self.redis.pipeline(transaction=True)
        for name, entries in batch:
            ids = []
            for entry_id, fields in entries:
                ids.append(entry_id)
                pos = parse_id(entry_id.decode())
                if pos <= self.done.get(name, (0, 0)):
                    self.stats["duplicates"] += 1
                    continue
                raw = fields.get(b"e", b"{}")
                self.stats["bytes"] += len(raw)
                self.stats["handled"] += 1
                try:
                    d = json.loads(raw)
                except ValueError:
                    log.warning("%s %s: not an event", escape_name(name), escape_name(entry_id))
                    d = None
                if d is not None and self.filter.matches(d):
                    matched += 1
                    emit(name, d, raw)
                self.done[name] = pos
            pipe.xack(name, self.group, *ids)
            if name in self.done:
                pipe.hset(done_key(self.group), name, f"{self.done[name][0]}-{self.done[name][1]}")
        pipe.execute()
        self.stats["matched"] += matched
        return matched

    # -- the loop

    def run(self, *, as_json: bool = False, exec_cmd: str | None = None, count: int | None = None,
            idle_exit: float | None = None, out=None, diff: bool = False) -> None:
        import redis

        from mirrorfs.stream.render import format_event

        out = out or sys.stdout
        argv = shlex.split(exec_cmd) if exec_cmd else None
        halt = threading.Event()  # a signal: stop now, even in the middle of a retry's wait
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: halt.set())

        def emit(stream: str, d: dict[str, Any], raw: bytes) -> None:
            if not diff and any(k in d for k in DIFF_FIELDS):
                for k in DIFF_FIELDS:
                    d.pop(k, None)
                raw = event_json(d).encode()
            if argv is not None:
                env = {**os.environ, "MIRRORFS_EVENT": raw.decode(errors="surrogateescape"),
                       "MIRRORFS_STREAM": stream, "MIRRORFS_KIND": str(d.get("kind")), "MIRRORFS_VM": str(d.get("vm"))}
                path = str(d.get("path", ""))
                try:
                    rc = subprocess.run([*argv, os.fsencode(path)], env=env, stdin=subprocess.DEVNULL).returncode
                except OSError as exc:  # E2BIG: an event too long for one environment string (128 KiB)
                    if "diff" in d and exc.errno == errno.E2BIG:
                        del d["diff"]
                        d["diff_skipped"] = "too long for MIRRORFS_EVENT"
                        emit(stream, d, event_json(d).encode())
                    else:
                        log.warning("cannot run %s for %s: %s", argv[0], escape_name(path), exc.strerror)
                    return
                if rc != 0:
                    log.warning("%s exited %d for %s", argv[0], rc, escape_name(path))
            else:
                # Text for a terminal: guest names (and the VM name, from another host) escaped as `ls -b` does.
                try:
                    line = raw.decode() if as_json else \
                        format_event(Mutation.from_dict(d), False)
                except (TypeError, ValueError, AttributeError):
                    log.warning("%s: an entry that is not an event", escape_name(stream))
                    return
                if not as_json:
                    line = f"{escape_name(str(d.get('vm', '-'))[:16]):<16} {line}"
                out.write(line + "\n")
                out.flush()

        backoff = Backoff(halt=halt)
        last_event = time.monotonic()
        total = 0
        try:
            while not halt.is_set():
                try:
                    batch = self.read()
                    if batch:
                        total += self.handle(batch, emit)
                        last_event = time.monotonic()
                    backoff.reset()
                except redis.AuthenticationError as exc:
                    raise auth_failed(self.url, exc) from None
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError) as exc:
                    self.stats["reconnects"] += 1
                    for name in self.streams:
                        self.streams[name] = "0"   # re-read our pending entries: the done mark drops repeats
                    d = backoff.wait()
                    log.warning("redis unavailable (%s); retried after %.1f s", exc, d)
                    continue
                except redis.ResponseError as exc:
                    if "NOGROUP" in str(exc):      # a stream or the group vanished (Redis restarted empty)
                        self.streams.clear()
                        continue
                    if "LOADING" in str(exc):
                        backoff.wait()
                        continue
                    raise
                if count is not None and total >= count:
                    return
                if idle_exit is not None and time.monotonic() - last_event > idle_exit:
                    return
        except Halted:  # a signal during a retry's wait
            return

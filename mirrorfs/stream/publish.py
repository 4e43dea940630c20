"""The host publisher: a state directory's mutation events into a Redis stream (`mirrorfs publish`).

Redis Streams is the distributed backbone; this is only a careful client. One stream per VM. Each entry's
ID is the event id SEQ-N, so the stream is ordered like the event log and Redis itself rejects an entry it
already holds ("equal or smaller than the target stream top item"): the publisher may resend after a crash
or a lost reply (at least once), yet the stream holds each event once. Entries carry the event's JSON in one
field `e`. Filtering happens before XADD, so only what the collectors asked for crosses the network. With `diff`
the publisher adds each text file change's diff (mirrorfs/stream/diffs.py) here, where the engine's store is, so
it reaches collectors on other hosts.

The position (byte offset in events.jsonl, last event id, the file's inode) is saved in DIR/publish.json
after every acknowledged batch; on restart the publisher resumes there (or re-scans from the start, skipping
what is published, when the event log was rewritten by a new replay).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from inference.eventlog import EventTail
from inference.events import event_json, format_id, parse_id
from inference.wake import DirWake
from mirrorfs.stream.filters import Filter
from tap.state import read_json, write_json_atomic

log = logging.getLogger("mirrorfs.publish")

DEFAULT_MAXLEN = 1_000_000
DEFAULT_REGISTRY = "mirrorfs:streams"
OWNERS = "mirrorfs:stream-owners"   # hash: stream -> "host:state dir", so two VMs never share a stream
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
STOP_CHECK = 1.0  # a caller's own stop() (not a signal) is looked at this often while the log is idle


PASSWORD_ENV = "REDISCLI_AUTH"   # the variable redis-cli reads, so one setting serves both


def redis_password(url: str, password_file: Path | None = None) -> str | None:
    """The Redis password, from `password_file` or $REDISCLI_AUTH, never from the command line: a password
    inside --redis URL is refused, since every local user reads argv (ps, /proc/PID/cmdline)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    if parts.password or "password" in parse_qs(parts.query):
        raise ValueError("--redis: a password in the URL is visible to every local user (ps, /proc/PID/cmdline); "
                         "remove it and put it in a file given by --redis-password-file FILE, or in the "
                         f"{PASSWORD_ENV} environment variable")
    if password_file is not None:
        try:
            text = Path(password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"--redis-password-file {password_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--redis-password-file {password_file}: not text") from None
        if not text or "\n" in text:
            raise ValueError(f"--redis-password-file {password_file}: expected one line, the password")
        return text
    return os.environ.get(PASSWORD_ENV) or None


def auth_failed(url: str, exc: BaseException) -> ValueError:
    """A refused password is not an outage: say so once, rather than retry forever."""
    where = url.split("@")[-1]
    return ValueError(f"redis at {where} refused us: {exc} (give its password with --redis-password-file FILE or "
                      f"the {PASSWORD_ENV} environment variable)")


def default_stream(state_dir: Path) -> str:
    return f"mirrorfs:events:{socket.gethostname()}:{Path(state_dir).absolute().name}"


def is_duplicate_error(exc: BaseException) -> bool:
    return "equal or smaller than the target stream top item" in str(exc)


class Halted(Exception):
    """A signal asked us to stop while we waited for Redis."""


class Backoff:
    """Exponential backoff with jitter, reset by success. `halt` (set by a signal handler) ends a wait at once,
    and the wait raises Halted: SIGTERM must not wait out a retry against a Redis that is down."""

    def __init__(self, low: float = BACKOFF_MIN, high: float = BACKOFF_MAX,
                 halt: threading.Event | None = None) -> None:
        self.low, self.high, self.delay = low, high, low
        self.halt = halt or threading.Event()

    def wait(self) -> float:
        d = self.delay * random.uniform(0.5, 1.0)
        if self.halt.wait(d):
            raise Halted
        self.delay = min(self.delay * 2, self.high)
        return d

    def reset(self) -> None:
        self.delay = self.low


class Publisher:
    def __init__(self, state_dir: Path, url: str, *, stream: str | None = None, flt: Filter | None = None,
                 maxlen: int = DEFAULT_MAXLEN, batch: int = 500, registry: str = DEFAULT_REGISTRY,
                 password: str | None = None, diff: bool = False) -> None:
        import redis

        from mirrorfs.stream.diffs import Differ

        self.state_dir = Path(state_dir).absolute()
        self.events_path = self.state_dir / "events.jsonl"
        self.pos_path = self.state_dir / "publish.json"
        self.url = url
        self.stream = stream or default_stream(self.state_dir)
        self.filter = flt or Filter()
        self.maxlen, self.batch, self.registry = maxlen, max(batch, 1), registry
        self.owner = f"{socket.gethostname()}:{self.state_dir}"
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                          **({"password": password} if password else {}))
        self.halt = threading.Event()  # set by SIGINT/SIGTERM (run): retries end at once
        self.stats = {"sent": 0, "duplicates": 0, "filtered": 0, "batches": 0, "reconnects": 0, "bytes": 0}
        saved = (read_json(self.pos_path) or {}).get("streams", {}).get(self.stream, {})
        self.after: tuple[int, int] = parse_id(saved["after"]) if saved.get("after") else (0, 0)
        offset = int(saved.get("offset", 0))
        try:
            ino = os.stat(self.events_path).st_ino
        except FileNotFoundError:
            ino = None
        if saved.get("inode") != ino or (ino is not None and os.stat(self.events_path).st_size < offset):
            offset = 0   # the log was rewritten: scan from the start, skipping ids already published
        self.tail = EventTail(self.events_path, offset)
        self._registered = False
        self.differ = Differ(self.state_dir) if diff else None

    def position_text(self) -> str:
        return f"after event {format_id(*self.after)}" if self.after != (0, 0) else "the start"

    def _save(self) -> None:
        doc = read_json(self.pos_path) or {}
        streams = doc.setdefault("streams", {})
        try:
            ino = os.stat(self.events_path).st_ino
        except FileNotFoundError:
            ino = None
        streams[self.stream] = {"after": format_id(*self.after), "offset": self.tail.offset, "inode": ino,
                                "redis": self.url.split("@")[-1], "updated": time.time()}
        write_json_atomic(self.pos_path, doc)

    def _register(self) -> None:
        """Claim the stream for this state directory and list it for collectors (idempotent)."""
        if self._registered:
            return
        self.redis.hsetnx(OWNERS, self.stream, self.owner)
        owner = self.redis.hget(OWNERS, self.stream)
        if owner is not None and owner.decode() != self.owner:
            raise ValueError(f"stream {self.stream} is published from {owner.decode()}; one stream per VM: "
                             "choose another --stream (or HDEL the old owner if that VM is gone)")
        self.redis.sadd(self.registry, self.stream)
        self._registered = True

    def _prepare(self, lines: list[tuple[int, bytes]]) -> list[tuple[str, bytes]]:
        """(entry id, event JSON) of the lines that pass the filter and are not published yet."""
        out: list[tuple[str, bytes]] = []
        for _end, line in lines:
            try:
                d = json.loads(line)
            except ValueError:
                log.warning("skipping a malformed event log line")
                continue
            if not d.get("id"):
                continue  # a log written before event ids: replay it to give its events ids
            pos = parse_id(d["id"])
            if pos <= self.after:
                continue
            if not self.filter.matches(d):
                self.stats["filtered"] += 1
                continue
            if self.differ is not None and self.differ.add_to_dict(d):
                line = event_json(d).encode()
            out.append((d["id"], line))
        return out

    def _send(self, entries: list[tuple[str, bytes]]) -> None:
        """One pipelined round trip; duplicates are fine, any other error raises (the batch is retried)."""
        import redis

        self._register()
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, line in entries:
            pipe.xadd(self.stream, {"e": line}, id=entry_id, maxlen=self.maxlen, approximate=True)
        results = pipe.execute(raise_on_error=False)
        for (_entry_id, line), res in zip(entries, results, strict=True):
            if isinstance(res, redis.ResponseError) and is_duplicate_error(res):
                self.stats["duplicates"] += 1
            elif isinstance(res, Exception):
                raise res
            else:
                self.stats["sent"] += 1
                self.stats["bytes"] += len(line)
        self.stats["batches"] += 1

    def step(self) -> int:
        """Publish what the log holds now, one batch at a time; returns lines read (0: caught up)."""
        lines = self.tail.poll(max_bytes=256 * max(self.batch, 1))
        if self.tail.restarted:
            self.tail.restarted = False
            self.after = (0, 0)   # a new replay rewrote the log with the same ids: Redis rejects the repeats
        if not lines:
            return 0
        entries = self._prepare(lines)
        for i in range(0, len(entries), self.batch):
            self._send_with_retry(entries[i:i + self.batch])
            self.after = parse_id(entries[min(i + self.batch, len(entries)) - 1][0])
        last = lines[-1][1]
        try:
            self.after = max(self.after, parse_id(json.loads(last)["id"]))
        except (ValueError, KeyError, TypeError):
            pass
        self._save()
        return len(lines)

    def _send_with_retry(self, entries: list[tuple[str, bytes]]) -> None:
        import redis

        backoff = Backoff(halt=self.halt)
        while True:
            try:
                self._send(entries)
                return
            except redis.AuthenticationError as exc:
                raise auth_failed(self.url, exc) from None
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError) as exc:
                self._registered = False
                self.stats["reconnects"] += 1
                d = backoff.wait()
                log.warning("redis unavailable (%s); retried after %.1f s", exc, d)
            except redis.ResponseError as exc:
                if "LOADING" in str(exc) or "MASTERDOWN" in str(exc) or "READONLY" in str(exc):
                    backoff.wait()
                    continue
                raise

    def run(self, *, follow: bool = True, stop: Any = None) -> None:
        """Publish until the end of the log (follow=False) or forever; `stop()` true ends a follow."""
        import signal

        wake = DirWake(Path(self.events_path).parent)  # the engine's appends to events.jsonl wake us
        if stop is None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: (self.halt.set(), wake.wake()))
            stop = self.halt.is_set
        try:
            while True:
                wake.drain()  # before the read: an append after it ends the wait below
                if self.step():
                    continue
                if not follow or stop():
                    return
                wake.wait(STOP_CHECK)
        except Halted:
            log.warning("stopped while Redis was unavailable; a restart resumes after %s", format_id(*self.after))
        finally:
            wake.close()
            self.tail.close()
            if self.differ is not None:
                self.differ.close()

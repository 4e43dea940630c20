"""A bare tap for the ingest benchmark: the real TapBackend (WriteLog + BlockReplica) behind the real NBD
server on a unix socket, with no QEMU or QMP, and attach's once-a-second log fsync. Prints `ready` once it
listens; SIGTERM/SIGINT end it cleanly.

    python -m tests.bench.tapserver --state DIR --size BYTES --socket PATH
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import trio

from tap import nbd
from tap.replica import BlockReplica
from tap.server import TapBackend, open_listeners, serve_nbd
from tap.state import EXPORT_NAME
from tap.writelog import WriteLog


async def flush_every_second(writelog: WriteLog) -> None:
    """As attach does: fsync the log from a worker thread once a second, off the ack path."""
    while True:
        await trio.sleep(1)
        await trio.to_thread.run_sync(writelog.flush)


async def main(state: Path, size: int, socket: Path) -> None:
    state.mkdir(parents=True, exist_ok=True)
    writelog = WriteLog(state / "log")  # fsync policy as attach's default ("flush")
    replica = BlockReplica(state / "replica.img", size)
    backend = TapBackend(replica=replica, writelog=writelog)
    try:
        listeners = await open_listeners([f"unix:{socket}"])
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_nbd, listeners, {EXPORT_NAME: nbd.Export(name=EXPORT_NAME, size=size)},
                                    backend)
                nursery.start_soon(flush_every_second, writelog)
                print("ready", flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    finally:
        writelog.flush()
        replica.close()
        writelog.close()
        print(f"stats writes={backend.stats.writes} bytes={backend.stats.bytes} flushes={backend.stats.flushes}",
              flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--socket", type=Path, required=True)
    a = p.parse_args()
    trio.run(main, a.state, a.size, a.socket)

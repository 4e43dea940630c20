"""QMP (QEMU Machine Protocol) as a sans-I/O state machine: JSON lines in, messages out.

The trio client in `tap.qmp_client` feeds it bytes; tests feed it strings. QEMU is trusted more
than the guest, but a line is still bounded so a broken peer cannot make us buffer without end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_LINE = 64 << 20  # query-named-block-nodes on a big qcow2 chain can be megabytes


@dataclass(frozen=True, slots=True)
class Greeting:
    version: dict[str, Any]
    capabilities: list[Any]


@dataclass(frozen=True, slots=True)
class Return:
    id: Any
    value: Any


@dataclass(frozen=True, slots=True)
class Error:
    id: Any
    cls: str
    desc: str


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    data: dict[str, Any]
    timestamp: float


@dataclass(frozen=True, slots=True)
class ProtocolError:
    message: str


Message = Greeting | Return | Error | Event | ProtocolError


@dataclass
class QMPProtocol:
    """Parses the QMP stream and builds commands with unique ids."""

    _buffer: bytearray = field(default_factory=bytearray)
    _next_id: int = 1
    closed: bool = False

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Return (id, wire bytes) for one command; the id matches the Return or Error."""
        cid = self._next_id
        self._next_id += 1
        msg: dict[str, Any] = {"execute": name, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        return cid, json.dumps(msg).encode() + b"\n"

    def receive_data(self, data: bytes) -> list[Message]:
        """Feed bytes; return every complete message they finish."""
        if self.closed:
            return []
        self._buffer += data
        out: list[Message] = []
        while True:
            nl = self._buffer.find(b"\n")
            if nl < 0:
                if len(self._buffer) > MAX_LINE:
                    self.closed = True
                    out.append(ProtocolError(f"QMP line longer than {MAX_LINE} bytes"))
                return out
            line = bytes(self._buffer[:nl]).strip()
            del self._buffer[: nl + 1]
            if line:
                out.append(parse_message(line))

    def connection_lost(self) -> None:
        self.closed = True


def parse_message(line: bytes) -> Message:
    """Classify one JSON line as QEMU sends it."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return ProtocolError(f"QMP sent invalid JSON: {exc}")
    if not isinstance(obj, dict):
        return ProtocolError("QMP sent a JSON value that is not an object")
    if "QMP" in obj:
        qmp = obj["QMP"] if isinstance(obj["QMP"], dict) else {}
        return Greeting(version=qmp.get("version", {}), capabilities=qmp.get("capabilities", []))
    if "return" in obj:
        return Return(id=obj.get("id"), value=obj["return"])
    if "error" in obj:
        err = obj["error"] if isinstance(obj["error"], dict) else {}
        return Error(id=obj.get("id"), cls=str(err.get("class", "GenericError")), desc=str(err.get("desc", "")))
    if "event" in obj:
        ts = obj.get("timestamp") or {}
        try:
            stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        except (TypeError, ValueError, AttributeError):
            stamp = 0.0
        data = obj.get("data")
        return Event(name=str(obj["event"]), data=data if isinstance(data, dict) else {}, timestamp=stamp)
    return ProtocolError(f"QMP sent an unknown message: {line[:200]!r}")

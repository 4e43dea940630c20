"""QMP sans-I/O parsing: the messages QEMU sends, and what a broken peer must not do to us."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tap import qmp


def test_greeting_return_error_event_in_one_chunk_or_split():
    wire = (b'{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}}\r\n'
            b'{"return": {}, "id": 1}\r\n'
            b'{"error": {"class": "GenericError", "desc": "Cannot find device=nope"}, "id": 2}\r\n'
            b'{"timestamp": {"seconds": 10, "microseconds": 500000}, "event": "BLOCK_JOB_READY",'
            b' "data": {"device": "mirrorfs-drive0", "len": 0}}\r\n')
    whole = qmp.QMPProtocol().receive_data(wire)
    p = qmp.QMPProtocol()
    split = [m for i in range(len(wire)) for m in p.receive_data(wire[i:i + 1])]
    assert whole == split
    greeting, ret, err, ev = whole
    assert greeting == qmp.Greeting(version={"qemu": {"major": 7}}, capabilities=["oob"])
    assert ret == qmp.Return(id=1, value={})
    assert err == qmp.Error(id=2, cls="GenericError", desc="Cannot find device=nope")
    assert ev == qmp.Event(name="BLOCK_JOB_READY", data={"device": "mirrorfs-drive0", "len": 0}, timestamp=10.5)


def test_command_ids_are_unique_and_wire_is_json_line():
    p = qmp.QMPProtocol()
    a, wa = p.command("qmp_capabilities")
    b, wb = p.command("blockdev-mirror", {"job-id": "j", "sync": "none"})
    assert a != b and wa.endswith(b"\n") and wb.endswith(b"\n")
    assert json.loads(wb) == {"execute": "blockdev-mirror", "id": b, "arguments": {"job-id": "j", "sync": "none"}}
    assert "arguments" not in json.loads(wa)


def test_overlong_line_closes(monkeypatch):
    monkeypatch.setattr(qmp, "MAX_LINE", 1000)
    p = qmp.QMPProtocol()
    out = p.receive_data(b"{" + b"x" * 2000)
    assert isinstance(out[-1], qmp.ProtocolError) and p.closed
    assert p.receive_data(b'{"return": {}}\n') == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_garbage_never_raises(chunks):
    p = qmp.QMPProtocol()
    for c in chunks:
        for m in p.receive_data(c):
            assert isinstance(m, qmp.Greeting | qmp.Return | qmp.Error | qmp.Event | qmp.ProtocolError)

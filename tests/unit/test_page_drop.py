"""The view's page drops (mirrorfs.view.serve.PageDropper): done in their own thread, and a caller can wait for one
(the poke helper does, boundedly, before it grows a file: issue 10's less +F reading an old last page)."""

from __future__ import annotations

import threading

import mirrorfs.view.serve as serve


def test_a_drop_can_be_waited_for_and_a_queued_node_is_dropped_once(monkeypatch):
    calls: list[tuple[int, bool]] = []
    gate = threading.Event()

    def invalidate(nid: int, attr_only: bool) -> None:
        gate.wait(5)
        calls.append((nid, attr_only))

    monkeypatch.setattr(serve.pyfuse3, "invalidate_inode", invalidate)
    dropper = serve.PageDropper()
    try:
        first = dropper.drop(7)           # taken by the thread at once; it blocks in the kernel's invalidation
        second, again = dropper.drop(8), dropper.drop(8)
        assert second is again, "a node already queued is dropped once, for every waiter"
        assert not first.wait(0.05), "not done while the kernel still drops the pages"
        gate.set()
        assert first.wait(5) and second.wait(5)
        assert calls == [(7, False), (8, False)]
    finally:
        gate.set()
        dropper.stop()

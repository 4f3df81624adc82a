"""The primary's Hub and a worker's Replica over a socketpair, in one process: the order of a
commit's answer and its changes, and a read waiting for changes published but not yet sent."""

from __future__ import annotations

import socket
import threading

import numpy as np

from store.changes import Change
from store.replication import Channel, Hub, PublishedLSN, Replica


def _change(lsn: int) -> Change:
    return Change("upsert", [f"id-{lsn}"], [None], np.zeros((1, 4), np.float32), np.zeros((1, 2), np.float32), lsn=lsn)


def test_a_commit_is_answered_before_its_changes_are_sent_and_after_its_lsn_is_published():
    published = PublishedLSN(("audio", "visual"))
    hub: Hub

    def commit(modality: str, lsn: int) -> int:
        hub.logged(modality, [_change(lsn)])  # what the shard's on_logged hook does
        return 41

    hub = Hub(published, {"commit": commit})
    ours, theirs = socket.socketpair()
    worker = Channel(theirs)
    hub.attach(1234, Channel(ours))
    try:
        worker.send((7, "commit", ("audio", 5)))
        reply = worker.receive()
        lsn_at_answer = published["audio"]
        sent = worker.receive()
    finally:
        hub.close()
        worker.close()
    assert reply == ("reply", 7, True, 41)
    assert lsn_at_answer == 5  # a read that starts after the answer waits for change 5
    assert sent[0] == "apply" and sent[1] == "audio" and sent[3] == 5
    assert [c.ids for c in sent[2]] == [["id-5"]] and sent[2][0].features is None  # raw features stay in the primary


def test_a_read_waits_for_changes_published_before_they_arrive():
    published = PublishedLSN(("audio", "visual"))
    applied: list[int] = []
    ours, theirs = socket.socketpair()
    primary = Channel(ours)
    replica = Replica(Channel(theirs), published, {"audio": 4, "visual": 0}, lambda modality, changes: applied.extend(c.lsn for c in changes))
    replica.start()
    published["audio"] = 5
    caught_up = threading.Event()
    reader = threading.Thread(target=lambda: (replica.catch_up(), caught_up.set()))
    reader.start()
    try:
        assert not caught_up.wait(0.3)  # change 5 is published, not yet here
        primary.send(("apply", "audio", [_change(5)], 5))
        assert caught_up.wait(10)
        assert applied == [5]
    finally:
        primary.close()
        reader.join(10)

"""cache/handoff.py: what a cache node's serve and upstream threads pass each other."""

from __future__ import annotations

import threading

import zmq

from canopy.cache.handoff import Handoff, Note
from canopy.version import Version


def test_notes_reach_the_serve_end_in_order_and_wake_its_poller() -> None:
    ctx = zmq.Context()
    handoff = Handoff(ctx)
    try:
        assert list(handoff.notes()) == []
        told = [(Note.CHUNK, Version(1, 1)), (Note.CHUNK, Version(1, 1)), (Note.LANDED, Version(1, 1))]

        def upstream() -> None:
            for note, version in told:
                handoff.tell(note, version)

        thread = threading.Thread(target=upstream)
        thread.start()
        thread.join()
        assert handoff.wake.poll(1000)
        assert list(handoff.notes()) == told
    finally:
        handoff.close_upstream_end()
        handoff.close_serve_end()
        ctx.term()


def test_wanted_versions_are_taken_once_and_can_be_wanted_again() -> None:
    ctx = zmq.Context()
    handoff = Handoff(ctx)
    try:
        assert not handoff.has_wanted()
        handoff.want(Version(1, 2))
        handoff.want(Version(1, 3))
        assert handoff.has_wanted()
        taken = handoff.take_wanted()
        assert taken == {Version(1, 2), Version(1, 3)} and not handoff.has_wanted()
        handoff.want_again(taken)
        assert handoff.take_wanted() == taken
    finally:
        handoff.close_upstream_end()
        handoff.close_serve_end()
        ctx.term()


def test_the_upstream_thread_sees_the_versions_children_are_parked_on() -> None:
    ctx = zmq.Context()
    handoff = Handoff(ctx)
    try:
        parked = {Version(2, 1): ["child"]}
        handoff.set_waited(parked)
        parked.clear()  # the serve thread's table changes; the published set does not
        assert handoff.waited(Version(2, 1)) and not handoff.waited(Version(2, 2))
        handoff.set_waited(parked)
        assert not handoff.waited(Version(2, 1))
    finally:
        handoff.close_upstream_end()
        handoff.close_serve_end()
        ctx.term()

"""A queue carrying small events (progress, skipped files, warnings) from Ray workers and
tasks to the driver; it works on the embedded instance and on remote clusters alike."""

from __future__ import annotations

import queue


def make_channel():
    from ray.util.queue import Queue  # deferred: see agpctl.cluster

    return Queue(maxsize=10_000, actor_options={"num_cpus": 0})


def make_local_channel() -> queue.Queue:
    """The same channel within one process (a run in Ray Train's local mode): no Ray needed."""
    return queue.Queue(maxsize=10_000)


def drain(channel) -> list[tuple]:
    """Every event waiting in ``channel``, without blocking."""
    events = []
    while True:
        try:
            events.append(channel.get_nowait())
        except Exception:  # ray.util.queue.Empty, queue.Empty
            return events


def send(channel, event: tuple) -> None:
    """Best effort: a full or broken channel drops the event, never blocks the work."""
    if channel is None:
        return
    try:
        channel.put_nowait(event)
    except Exception:
        pass

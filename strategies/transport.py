"""Sending messages and collecting replies with a short, backing-off poll.

Flower's grids poll for replies at a fixed interval (0.1 s in simulation, 3 s
over gRPC). A protocol round trip is at least one such interval, and secure
aggregation has several per round, so :func:`send_and_receive` polls through
the public ``push_messages`` / ``pull_messages`` API starting at 5 ms and
backing off geometrically to ``max_interval``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["send_and_receive"]


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    min_interval: float = 0.005,
    max_interval: float = 0.25,
) -> list[Message]:
    """Push ``messages``, then pull replies until all arrived or ``timeout`` seconds passed.

    Objects that only stand in for a grid (the in-process grid, test doubles)
    use their own ``send_and_receive``. Replies that never come are simply
    missing. The server side reaches this only through an exchange
    (:func:`fedsec.strategies.pipeline.grid_exchange`), under its filters.
    """
    if not isinstance(grid, Grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    interval = min_interval
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 1.5, max_interval)
    return replies

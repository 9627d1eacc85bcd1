"""The server side as a pipeline of filters over an exchange of messages.

An *exchange* sends a list of messages to the nodes and returns the replies
that came back within a timeout. A *filter* stands between the round loop and
the next exchange: it sees the messages going out and the replies coming back,
and may drop replies (signature verification), rewrite them (the simulation's
colluding adversary) or send more messages through the next exchange. Filters
compose like Flower's client mods, outermost first::

    exchange = pipeline(grid, [verify_signatures(registry), collusion.filter])
    replies = exchange(messages, timeout)

The round loop (:meth:`FedSecStrategy.start`, fedsec's own experiment loop,
the secure-aggregation workflow) only ever calls an exchange, so every
server-side defense composes with every round type without posing as a
:class:`flwr.serverapp.Grid`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from flwr.app import Message
from flwr.serverapp import Grid

from .transport import send_and_receive

__all__ = ["Exchange", "Filter", "grid_exchange", "pipeline"]

#: A callable type: send messages, return the replies that arrived within a timeout.
Exchange = Callable[[list[Message], float], list[Message]]


class Filter(Protocol):
    """One step of the server-side pipeline.

    Called with the outgoing ``messages``, the ``next`` exchange (the rest of
    the pipeline down to the grid) and the ``timeout``; returns the replies the
    round loop gets. A filter that only inspects replies calls
    ``next(messages, timeout)`` once and filters its result.
    """

    def __call__(self, messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        """Exchange ``messages`` through ``next`` and return the replies to pass on."""
        ...


def grid_exchange(grid: Grid) -> Exchange:
    """The exchange at the bottom of every pipeline: ``grid``'s own transport.

    A Flower grid is polled with a short, backing-off interval
    (:func:`~fedsec.strategies.transport.send_and_receive`); stand-ins such as
    the in-process grid use their own ``send_and_receive``.
    """

    def exchange(messages: list[Message], timeout: float) -> list[Message]:
        return send_and_receive(grid, messages, timeout=timeout)

    return exchange


def pipeline(grid: Grid, filters: Sequence[Filter] = ()) -> Exchange:
    """Compose ``filters`` (outermost first) over ``grid``'s exchange."""
    exchange = grid_exchange(grid)
    for step in reversed(filters):
        exchange = _bind(step, exchange)
    return exchange


def _bind(step: Filter, inner: Exchange) -> Exchange:
    def exchange(messages: list[Message], timeout: float) -> list[Message]:
        return list(step(list(messages), inner, timeout))

    return exchange

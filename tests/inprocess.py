"""An in-process Grid that runs the ClientApp directly, for fast round-loop tests.

It stands in for Flower's simulation engine where Ray's start-up (seconds)
would buy nothing: the messages, the ClientApp and the ServerApp loop are the
real ones; only the transport is a function call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

Tamper = Callable[[Message], Message]


class InProcessGrid:
    """Nodes ``1..num_nodes`` with partition ids ``0..num_nodes-1``.

    ``tamper`` (optional) rewrites a node's reply, to play a faulty client;
    ``dead`` lists nodes that never reply.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        tamper: dict[int, Tamper] | None = None,
        dead: Iterable[int] = (),
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, num_nodes + 1)
        }
        self.tamper = tamper or {}
        self.dead = set(dead)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.dead:
                continue
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:  # Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            replies.append(self.tamper.get(node, lambda m: m)(reply))
        return replies

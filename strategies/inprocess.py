"""A sequential, in-process stand-in for Flower's simulation engine.

:class:`InProcessGrid` hands each message straight to a ClientApp in the same
process, one after another. The messages, the ClientApp and the ServerApp's
round loop are the real ones; only the transport is a function call. It suits
unit tests and sweeps over many small experiments, where starting Ray (seconds)
and its per-call overhead would dominate. Ray remains the engine for
``fedsec run`` and ``flwr run``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsec.attacks.threat import enable_simulated_adversary
from fedsec.wire import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

Tamper = Callable[[Message], Message | None]


class InProcessGrid:
    """Nodes ``1..num_nodes`` whose partition ids are ``0..num_nodes-1``.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    num_nodes : int
        Number of nodes (clients).
    tamper : dict[int, callable], optional
        Rewrites a node's reply (to play a faulty or malicious client in tests);
        returning None drops the reply (a node that vanishes mid-protocol).
    dead : iterable of int
        Nodes that never reply (dropouts).
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
                node_config={PARTITION_ID_KEY: node - 1, NUM_PARTITIONS_KEY: num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, num_nodes + 1)
        }
        self.tamper = tamper or {}
        enable_simulated_adversary()  # the clients run in this process, under simulation
        self.dead = set(dead)
        # Messages built outside a Flower runtime need a task identity.
        for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            if getattr(TaskIdentity, attr) is None:
                setattr(TaskIdentity, attr, value)

    def as_grid(self) -> Grid:
        """This object typed as Flower's Grid (it implements what the strategy uses)."""
        return cast(Grid, self)

    def get_node_ids(self) -> list[int]:
        """All node ids."""
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Run each message through its node's ClientApp and collect the replies."""
        replies = []
        for msg in messages:
            # As Flower's grids do on push: the id is the hash of the message.
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            if node in self.dead:
                continue
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:  # Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            tamper = self.tamper.get(node)
            kept = tamper(reply) if tamper else reply
            if kept is not None:
                replies.append(kept)
        return replies

"""An in-process Flower Grid: the real ServerApp ``main`` and ClientApp, no Ray, no SuperLink.

Every message is handed to the ClientApp of its destination node, one after the other; a
ClientApp exception becomes an error reply (as the Flower runtime does), so the server code
sees exactly what it would see in a simulation. Tests drive ``server_app.app.main`` with it;
``fedbicross run --engine apps`` uses it for quick experiments.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from client_app.app import app as client_app
from fedbicross_flwr.transports.task_identity import set_task_identity
from server_app.app import main

# A hook to alter what a node does, for fault-injection tests: (message, context, call) ->
# reply, or None for "no reply" (a node that never answers).
NodeBehaviour = Callable[[Message, Context, Callable[[Message, Context], Message]],
                         Message | None]


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(self, client_app: ClientApp, run_config: dict[str, Any], num_nodes: int,
                 run_id: int = 1, seed: int = 0,
                 behaviours: dict[int, NodeBehaviour] | None = None,
                 node_configs: list[dict[str, Any]] | None = None) -> None:
        rng = random.Random(seed)
        self.client_app = client_app
        # random like real node ids, in increasing order: the server assigns simulation
        # partitions to the sorted node ids, so node i (node_configs[i], behaviours[i]) gets
        # partition i, as its default node config says
        self.node_ids = sorted(rng.getrandbits(63) for _ in range(num_nodes))
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid,
                         node_config=(node_configs[i] if node_configs else
                                      {"partition-id": i, "num-partitions": num_nodes}),
                         state=RecordDict(), run_config=dict(run_config))
            for i, nid in enumerate(self.node_ids)
        }
        self.behaviours = {self.node_ids[i]: b for i, b in (behaviours or {}).items()}
        self._run = Run.create_empty(run_id)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._inbox: dict[str, Message] = {}  # message id -> its reply, until pulled
        set_task_identity(run_id)

    # --- Grid API ---------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Grid API: the run the messages belong to."""
        self._run = run

    @property
    def run(self) -> Run:
        """Grid API: the current run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """Grid API: a message to ``dst_node_id``."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Grid API: the simulated node ids."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now (the nodes answer at once); its id, as Flower's."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grids do
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            if nid not in self.contexts:
                continue
            context = self.contexts[nid]
            behaviour = self.behaviours.get(nid)
            reply = (behaviour(msg, context, self._call) if behaviour
                     else self._call(msg, context))
            if reply is PENDING:  # the node has not answered (yet): nothing to pull
                continue
            if reply is None:  # the node never answers: the SuperLink's expiry reply
                reply = Message(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                                      "Error: Reply Message Unavailable - The reply message "
                                      "has expired."), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            self._inbox[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that arrived (each returned once)."""
        replies = [self._inbox.pop(mid) for mid in message_ids if mid in self._inbox]
        self.replies.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Grid API: push ``messages`` and pull every reply (the nodes answer at once)."""
        return self.pull_messages(list(self.push_messages(messages)))

    def _call(self, msg: Message, context: Context) -> Message:
        try:
            return self.client_app(msg, context)
        except Exception as err:  # noqa: BLE001 - the runtime turns exceptions into errors
            reason = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


# A node behaviour returns PENDING for a reply that has not arrived (a node that hangs or went
# offline; remove it from ``grid.node_ids`` for the latter), None for one that never will (the
# SuperLink then answers with its expiry error, as Flower's does).
PENDING: Any = object()


def run_in_process(run_config: dict[str, Any], num_nodes: int,
                   **grid_kwargs: Any) -> tuple[InProcessGrid, Path]:
    """Run ``server_app.app.main`` against ``client_app.app.app`` in this process.

    Returns the grid (with every message sent and received) and the run folder.
    """
    grid = InProcessGrid(client_app, run_config, num_nodes, **grid_kwargs)
    context = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={},
                      state=RecordDict(), run_config=dict(run_config))
    run_dir = main(grid, context)
    return grid, run_dir  # type: ignore[return-value]

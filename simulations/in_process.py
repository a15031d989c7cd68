"""Flower's apps in this process, without Ray: the ServerApp drives a grid that hands each
message to the ClientApp of its node, one node after another, each node with a Context of its
own as a SuperNode keeps it. One process holds the base model, the data and (on a GPU) one CUDA
context for every node, so a run starts in the time of one model load; the nodes train one at a
time. The nodes, partitions and seeds are a Ray run's, so the rows match a Ray run's with the
same recipe up to float rounding (bytes exactly).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import ServerApp
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE_ID = 1000
RUN_ID = 1
SERVER_NODE_ID = 0


class InProcessGrid:
    """Nodes FIRST_NODE_ID + i hold partition i of ``num_nodes``; a ClientApp that raises gives
    its node's error reply (logged at ERROR, as Flower's engine logs it), and the run goes on."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        self.app = app
        self.contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=RUN_ID,
                node_id=FIRST_NODE_ID + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        return [self.deliver(message) for message in messages]

    def deliver(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        try:
            return self.app(message, self.contexts[node_id])
        except Exception as error:  # noqa: BLE001 - a node's failure becomes its error reply
            FLOWER_LOGGER.log(
                logging.ERROR, "ClientApp of node %s raised %r", node_id, error, exc_info=True
            )
            return Message(Error(code=0, reason=repr(error)), reply_to=message)


@contextmanager
def task_identity() -> Iterator[None]:
    """The run, task and node ids that messages built in this process carry."""
    previous = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, SERVER_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = previous


def run_in_process(server_app: ServerApp, client_app: ClientApp, num_nodes: int) -> None:
    """Run ``server_app`` over ``num_nodes`` nodes of ``client_app`` in this process."""
    grid = InProcessGrid(client_app, num_nodes)
    context = Context(
        run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config={}
    )
    with task_identity():
        server_app(grid, context)

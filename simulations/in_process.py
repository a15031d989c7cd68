"""Flower's apps in this process, without Ray: the ServerApp drives a grid that hands each
message to the ClientApp of its node, one node after another, each node with a Context of its
own as a SuperNode keeps it. One process holds the base model, the data and (on a GPU) one CUDA
context for every node, so a run starts in the time of one model load. The nodes, partitions and
seeds are a Ray run's, so the rows match a Ray run's with the same recipe up to float rounding
(bytes exactly).

With ``group_size`` G > 1 a round's training clients train G at a time in one forward/backward
per step (`fedlora.training.rendezvous`, docs/grouped-training.md): each message of a group runs
in a thread of its own, one thread at a time; a client that reaches its local training parks it
and the next thread starts; the group's parked jobs then train together
(`fedlora.training.grouped.train_jobs_together`), one group per frozen base, and each thread
finishes its reply in turn. Every node still gets its own message and answers with its own reply;
a group that cannot train together (rank patterns that differ by layer, learning rates or frozen
factors that differ) trains one client at a time, and so does a client whose training fails in
the group.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedlora.training.grouped import same_base_groups, train_jobs_together
from fedlora.training.local import TrainReport
from fedlora.training.rendezvous import CURRENT_SLOT, GroupSlot

FIRST_NODE_ID = 1000
RUN_ID = 1
SERVER_NODE_ID = 0


class InProcessGrid:
    """Nodes FIRST_NODE_ID + i hold partition i of ``num_nodes``; a ClientApp that raises gives
    its node's error reply (logged at ERROR, as Flower's engine logs it), and the run goes on.
    Training messages go ``group_size`` at a time to `deliver_group`."""

    def __init__(self, app: ClientApp, num_nodes: int, group_size: int = 1) -> None:
        self.app = app
        self.group_size = group_size
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
        messages = list(messages)
        training = all(m.metadata.message_type == MessageType.TRAIN for m in messages)
        if self.group_size == 1 or not training:
            return [self.deliver(message) for message in messages]
        replies = []
        for start in range(0, len(messages), self.group_size):
            replies += self.deliver_group(messages[start : start + self.group_size])
        return replies

    def deliver_group(self, messages: Sequence[Message]) -> list[Message]:
        """Each message's ClientApp in a thread of its own, one running at a time: a thread runs
        until its client parks its training or it has its reply; the parked jobs train together,
        then each parked thread finishes in turn. A parked thread is never left waiting: if the
        engine stops first (Ctrl-C), it resumes with that error."""
        replies: list[Message | None] = [None] * len(messages)
        slots: list[GroupSlot] = []
        threads: list[threading.Thread] = []
        outcomes: dict[int, tuple[TrainReport | None, BaseException | None]] = {}
        try:
            for index, message in enumerate(messages):
                slot = GroupSlot(index)
                thread = threading.Thread(
                    target=self.answer_in_slot,
                    args=(slot, message, replies),
                    name=f"fedlora-group-slot-{index}",
                    daemon=True,
                )
                slots.append(slot)
                threads.append(thread)
                thread.start()
                slot.parked_or_done.wait()
            outcomes = train_parked([slot for slot in slots if slot.job is not None])
        finally:
            stopped = (None, InterruptedError("the engine stopped before the group trained"))
            for slot, thread in zip(slots, threads, strict=True):
                if slot.job is not None:
                    slot.resume(*outcomes.get(slot.index, stopped))
                thread.join()
        return replies

    def deliver(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        try:
            return self.app(message, self.contexts[node_id])
        except Exception as error:  # noqa: BLE001 - a node's failure becomes its error reply
            FLOWER_LOGGER.log(
                logging.ERROR, "ClientApp of node %s raised %r", node_id, error, exc_info=True
            )
            return Message(Error(code=0, reason=repr(error)), reply_to=message)

    def answer_in_slot(self, slot: GroupSlot, message: Message, replies: list) -> None:
        """The thread of one message of a group: its reply, the client's training parked with
        ``slot`` on the way (`fedlora.training.rendezvous`)."""
        CURRENT_SLOT.set(slot)
        try:
            replies[slot.index] = self.deliver(message)
        finally:
            slot.parked_or_done.set()


def train_parked(
    slots: Sequence[GroupSlot],
) -> dict[int, tuple[TrainReport | None, BaseException | None]]:
    """The parked jobs trained together, one group per frozen base (`same_base_groups`), or one at
    a time where a group cannot train together (a warning says why); (report, error) per slot
    index."""
    outcomes: dict[int, tuple[TrainReport | None, BaseException | None]] = {}
    for members in same_base_groups([slot.job.model for slot in slots]):
        group = [slots[member] for member in members]
        if len(group) > 1:
            try:
                reports = train_jobs_together([slot.job for slot in group])
                outcomes.update(
                    {
                        slot.index: (report, None)
                        for slot, report in zip(group, reports, strict=True)
                    }
                )
                continue
            except Exception as error:  # noqa: BLE001 - each client then trains alone
                FLOWER_LOGGER.log(
                    logging.WARNING,
                    "A group of %d clients trains one at a time: %s",
                    len(group),
                    error,
                )
        for slot in group:
            try:
                outcomes[slot.index] = (slot.job.alone(), None)
            except Exception as error:  # noqa: BLE001 - the client's thread raises it
                outcomes[slot.index] = (None, error)
    return outcomes


@contextmanager
def task_identity() -> Iterator[None]:
    """The run, task and node ids that messages built in this process carry."""
    previous = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, SERVER_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = previous


def run_in_process(
    server_app: ServerApp, client_app: ClientApp, num_nodes: int, group_size: int = 1
) -> None:
    """Run ``server_app`` over ``num_nodes`` nodes of ``client_app`` in this process, training
    ``group_size`` clients at a time together."""
    grid = InProcessGrid(client_app, num_nodes, group_size)
    context = Context(
        run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config={}
    )
    with task_identity():
        server_app(grid, context)

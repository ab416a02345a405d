"""Flower 1.42 reads the sender identity of a new Message from process-wide state.

Inside a Flower run it is set; the in-process Grid and the direct engine, which build
Messages outside one, set it here.
"""

from __future__ import annotations

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


def set_task_identity(run_id: int) -> None:
    """Flower 1.42 reads the sender identity of a new Message from process-wide state."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1


def ensure_task_identity(run_id: int = 1) -> None:
    """Set the task identity unless a Flower run (or a test) has set it already."""
    try:
        TaskIdentity.run_id  # noqa: B018 - raises when unset
    except RuntimeError:
        set_task_identity(run_id)


__all__ = ["ensure_task_identity", "set_task_identity"]

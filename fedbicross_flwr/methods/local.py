"""``local``: each client keeps its own model (no federation at all)."""

from __future__ import annotations

from fedbicross_flwr.methods.base import MethodInput, MethodOutput


def local(inp: MethodInput) -> MethodOutput:
    """Each client keeps its own model (the reference every federated method must beat)."""
    return MethodOutput(models={u.partition_id: u.state for u in inp.uploads},
                        clusters={u.partition_id: u.partition_id for u in inp.uploads})

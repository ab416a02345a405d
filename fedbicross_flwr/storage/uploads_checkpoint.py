"""``checkpoints/uploads.pt``: the phase-1 uploads a resumed run gives its server method.

The server stage's checkpoints belong to exactly these client models, so a resumed run uses
the uploads of the interrupted run even if the clients' retraining in phase 1 (needed: each
client must hold its own f_i again for Eq. 9) is not bit-identical. The file is plain tensor
data with its sha256 in ``uploads.pt.sha256``; on loading, the checksum is verified, the file
is read with ``torch.load(weights_only=True)`` and every upload goes through
:func:`~fedbicross_flwr.protocol.validate_upload` again, exactly as if a client had sent it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.protocol import ClientUpload, StateDict, num_examples_problem, validate_upload
from fedbicross_flwr.storage.checkpoint_io import (
    CheckpointRefused,
    load_with_sidecar,
    save_with_sidecar,
)

FORMAT = 1


def save_uploads(uploads: list[ClientUpload], path: Path) -> None:
    """Write the uploads and their sha256 (``<path>.sha256``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_with_sidecar({"format": FORMAT, "uploads": [
        {"partition_id": u.partition_id, "num_examples": u.num_examples, "state": u.state}
        for u in uploads]}, path, _sha_path(path))


def load_uploads(path: Path, reference: StateDict,
                 probe: Callable[[StateDict], str | None] | None = None,
                 max_examples: Mapping[int, int | None] | None = None) -> list[ClientUpload]:
    """The checkpointed uploads, each validated again, as if its client had just sent it.

    Parameters
    ----------
    max_examples : mapping, optional
        Partition -> the most training examples it can have (as for a live reply).

    Raises
    ------
    CheckpointRefused
        Missing or altered file (sha256), a path that is not a file, not plain tensor data, an
        unknown layout, or an upload that :func:`validate_upload` or the num-examples check
        refuses (named by partition and reason).
    """
    if path.exists() and not path.is_file():
        raise CheckpointRefused(f"checkpoint {path} is not a file")
    payload = load_with_sidecar(path, _sha_path(path))
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT
            and isinstance(payload.get("uploads"), list)):
        raise CheckpointRefused(f"checkpoint {path} does not hold uploads in format {FORMAT}")
    uploads = []
    for i, item in enumerate(payload["uploads"]):
        if not (isinstance(item, dict) and isinstance(item.get("partition_id"), int)):
            raise CheckpointRefused(f"checkpoint {path}: upload {i} has no partition_id")
        pid = item["partition_id"]
        problem = (validate_upload(item.get("state"), reference, probe)
                   or num_examples_problem(item.get("num_examples"),
                                           (max_examples or {}).get(pid)))
        if problem is not None:
            raise CheckpointRefused(f"checkpoint {path}: the upload of partition {pid} is "
                                    f"refused: {problem}")
        uploads.append(ClientUpload(pid, item["state"], int(item["num_examples"])))
    if len({u.partition_id for u in uploads}) != len(uploads):
        raise CheckpointRefused(f"checkpoint {path} holds a partition twice")
    return uploads


def checkpointed_uploads(run_dir: Path, uploads: list[ClientUpload], resume: bool,
                         reference: StateDict,
                         probe: Callable[[StateDict], str | None] | None = None,
                         max_examples: Mapping[int, int | None] | None = None
                         ) -> list[ClientUpload]:
    """Keep the phase-1 uploads in ``checkpoints/uploads.pt``; a resumed run reuses them.

    A refused checkpoint (see :func:`load_uploads`), or one that holds other partitions than
    this run's phase 1 accepted (a site dropped or added: the run never goes on silently with
    other sites), or another ``num-examples`` for a partition, is logged with its reason; the
    run's ``checkpoints/`` folder is set aside as ``checkpoints-refused-<time>/`` (its
    server-stage checkpoints were made from those uploads) and the server stage restarts from
    scratch with the new uploads.
    """
    folder = run_dir / "checkpoints"
    path = folder / "uploads.pt"
    if resume and path.exists():
        try:
            saved = load_uploads(path, reference, probe, max_examples)
            _same_sites(path, saved, uploads)
        except CheckpointRefused as err:
            aside = run_dir / f"checkpoints-refused-{time.strftime('%Y%m%d-%H%M%S')}"
            folder.rename(aside)
            log(logging.WARNING, "%s. The server stage restarts from scratch with the new "
                "uploads; the refused checkpoints are kept in %s", err, aside)
        else:
            fresh = {u.partition_id: u for u in uploads}
            same = fresh.keys() == {u.partition_id for u in saved} and all(
                all(torch.equal(u.state[k], fresh[u.partition_id].state[k]) for k in u.state)
                for u in saved)
            log(logging.INFO if same else logging.WARNING,
                "resume: using the %d checkpointed uploads of %s (the new uploads are %s)",
                len(saved), path, "identical" if same else "DIFFERENT")
            return saved
    save_uploads(uploads, path)
    return uploads


def _same_sites(path: Path, saved: list[ClientUpload], fresh: list[ClientUpload]) -> None:
    """Refuse checkpointed uploads of other partitions, or other counts, than phase 1's."""
    have, want = ({u.partition_id: u.num_examples for u in saved},
                  {u.partition_id: u.num_examples for u in fresh})
    if have.keys() != want.keys():
        raise CheckpointRefused(
            f"checkpoint {path} holds the uploads of partitions {sorted(have)}, but this run's "
            f"phase 1 accepted partitions {sorted(want)} (missing {sorted(want.keys() - have)}, "
            f"extra {sorted(have.keys() - want)})")
    for pid in sorted(have):
        if have[pid] != want[pid]:
            raise CheckpointRefused(
                f"checkpoint {path}: partition {pid} has num-examples={have[pid]}, but it "
                f"reported {want[pid]} in this run's phase 1")


def _sha_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")

"""What every baseline needs: the client models, the global student's start, the artefacts."""

from __future__ import annotations

from logging import INFO
from typing import Any

import torch
from torch import Tensor, nn

from ...distill.config import SynthesisConfig
from ...distill.plots import save_synthetic_grid
from ...distill.utils import derive_seed
from ...logging_utils import log
from ...model import load_resnet18, weighted_average
from ...storage.atomic import write_json
from ..base import MethodInput, MethodOutput, StateDict


def client_models(inp: MethodInput) -> list[nn.Module]:
    """The uploaded f_i as frozen eval-mode models on ``inp.device`` (uploads are not touched)."""
    models = []
    for upload in inp.uploads:
        models.append(load_resnet18(upload.state).to(inp.device).eval().requires_grad_(False))
    return models


def initial_student(inp: MethodInput, tag: int) -> nn.Module:
    """The global model's start, on ``inp.device`` in train mode.

    ``student-init='random'`` (the reference codes): a ResNet-18 from a seeded, forked RNG
    (``derive_seed(seed, tag)``, so the caller's RNG is untouched). ``'cluster-average'``: the
    data-size weighted average of ALL clients (they share w^(0)), i.e. the FedAvg-1 model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(inp.cfg.seed, tag))
        student = inp.new_model()
    if SynthesisConfig.of(inp.cfg).student_init == "cluster-average":
        student.load_state_dict(weighted_average([u.state for u in inp.uploads],
                                                 [float(u.num_examples) for u in inp.uploads]))
    return student.to(inp.device).train()


def cpu_state(model: nn.Module) -> StateDict:
    """A detached CPU copy of the state dict (what MethodOutput carries)."""
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


def finish(
    inp: MethodInput,
    name: str,
    student: nn.Module,
    images: Tensor | None,
    labels: Tensor | None,
    diagnostics: dict[str, Any],
) -> MethodOutput:
    """Write ``synthetic.png`` and ``<name>.json`` into the run folder; the global model for all.

    Parameters
    ----------
    inp : MethodInput
        The method's input (run folder, uploads).
    name : str
        Method name (file name of the diagnostics JSON).
    student : nn.Module
        The distilled global model.
    images : Tensor, optional
        (n, C_in, H, W) a few final synthetic images (normalised space) for the picture grid.
    labels : Tensor, optional
        (n,) their labels (target or teacher argmax).
    diagnostics : dict
        JSON-serialisable diagnostics (losses per epoch, wall times, ...).
    """
    if images is not None and len(images):
        save_synthetic_grid([images[:16].detach().cpu()], inp.run_dir / "synthetic.png",
                            labels_per_cluster=None if labels is None else [labels[:16].cpu()])
    write_json(inp.run_dir / f"{name}.json", diagnostics)
    state = cpu_state(student)
    log(INFO, "%s: one global model sent to %d clients", name, len(inp.uploads))
    return MethodOutput(models={u.partition_id: state for u in inp.uploads},
                        clusters={u.partition_id: 0 for u in inp.uploads},
                        diagnostics={"wall-time-s": diagnostics.get("wall_time_s"),
                                     **{k: v for k, v in diagnostics.items()
                                        if k.startswith("final")}})

"""Training both sides use: SGD epochs, local training, prediction and evaluation.

The client's phases (and Eq. 9, the personalized distillation) are in
:mod:`fedbicross_flwr.client`; the server scores models with the same evaluation functions.

Data stay as in-memory tensors and are moved to the device once per call, so the loop does
no per-batch host work beyond indexing (MedMNIST 28x28 sets fit easily in device memory).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbicross_flwr.keys.errors import ConfigError
from fedbicross_flwr.keys.sections import SharedConfig
from fedbicross_flwr.logging_utils import log
from fedbicross_flwr.model import is_channels_last


def resolve_device(name: str) -> torch.device:
    """The torch device of ``name``: ``auto`` (CUDA when available, else CPU), ``cpu``,
    ``cuda`` or ``cuda:<index>``.

    Raises
    ------
    ConfigError
        Another name, or a CUDA device that this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", name):
        raise ConfigError(f"device {name!r} is not cpu, cuda or cuda:<index> (or auto)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but torch sees no CUDA device on this machine (use "
                          "device='auto' or 'cpu')")
    count = torch.cuda.device_count() if name.startswith("cuda") else 0
    if int(name.partition(":")[2] or 0) >= count > 0:
        raise ConfigError(f"device={name!r} but torch sees {count} CUDA device(s) on this "
                          f"machine (cuda:0 to cuda:{count - 1})")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); True if unknown."""
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is None for check in checks):
        return True  # an older torch cannot tell: do not warn
    return any(check() for check in checks)  # type: ignore[misc]


_warned_emulated_bf16 = False


def uses_bf16(device: torch.device | str, precision: str) -> bool:
    """Whether ``precision`` runs in bf16 on ``device``: 'bf16' always, 'auto' where the device
    has native bfloat16 (:func:`cpu_has_native_bf16`, or a CUDA GPU with bf16), 'fp32' never.
    """
    if precision != "auto":
        return precision == "bf16"
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return kind == "cpu" and cpu_has_native_bf16()


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when :func:`uses_bf16`, a no-op otherwise (client and server).

    On a CPU without native bfloat16 (AVX2 only) bf16 is emulated and slower than fp32: the
    first such region of the process with ``precision='bf16'`` logs a warning that says so
    (``'auto'`` runs fp32 there).
    """
    global _warned_emulated_bf16
    if uses_bf16(device, precision):
        kind = torch.device(device).type
        if kind == "cpu" and not _warned_emulated_bf16 and not cpu_has_native_bf16():
            _warned_emulated_bf16 = True
            log(logging.WARNING, "precision='bf16' on a CPU without native bfloat16 (no "
                "AVX512-BF16 or AMX): autocast is emulated, about 11x slower than fp32 for a "
                "width-16 training step on such a CPU (docs/BENCHMARKS.md); set "
                "precision='fp32' or 'auto' here")
        return torch.autocast(device_type=kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_off(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast switched off inside an :func:`autocast` region (which keeps its weight-cast
    cache until the outer region ends); a no-op when :func:`uses_bf16` is False.
    """
    if uses_bf16(device, precision):
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class SGDSettings:
    """Optimiser settings of one client-side training loop."""

    epochs: int  # passes over the local training data
    lr: float  # SGD learning rate
    momentum: float  # SGD momentum
    weight_decay: float  # L2 penalty
    batch_size: int  # mini-batch size
    seed: int  # seeds the batch order


def client_seed(cfg: SharedConfig, partition_id: int) -> int:
    """Seed of everything random at one client (model init, batch order)."""
    return cfg.seed * 100_003 + partition_id


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def sgd_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: SGDSettings,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               device: torch.device, precision: str = "fp32", desc: str = "",
               progress: bool = True) -> list[float]:
    """Mini-batch SGD on (x, y) with ``loss_fn(logits, batch_indices)``; mean loss per epoch.

    x and y move to the device once; batches are index slices (no per-batch host copies).
    """
    model.to(device).train()
    x, y = x.to(device), y.to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum,
                          weight_decay=opt.weight_decay)
    gen = torch.Generator().manual_seed(opt.seed)
    history = []
    start = time.perf_counter()
    for epoch in range(opt.epochs):
        total, seen = 0.0, 0
        for idx in _batches(len(y), opt.batch_size, gen):
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            idx = idx.to(device)
            with autocast(device, precision):
                logits = model(x[idx])  # (b, C)
            loss = loss_fn(logits.float(), idx)
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history.append(total / max(seen, 1))
        if progress and (epoch + 1) % max(1, opt.epochs // 5) == 0:
            log(logging.INFO, "%s epoch %d/%d loss %.4f (%.1fs)", desc, epoch + 1,
                opt.epochs, history[-1], time.perf_counter() - start)
    return history


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: SGDSettings,
                device: torch.device, precision: str = "fp32", desc: str = "",
                progress: bool = True, proximal_mu: float = 0.0) -> list[float]:
    """Train ``model`` with cross-entropy on (x, y); returns the mean loss of every epoch.

    With ``proximal_mu`` > 0 the loss gets FedProx's proximal term
    (mu / 2) * ||w - w_start||^2 over the trainable parameters, w_start being the weights the
    model had when this call began (the global model a client received).
    """
    y_dev = y.to(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []  # w^t

    def loss_fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y_dev[idx])
        if proximal_mu > 0:
            loss = loss + proximal_term(params, anchor, proximal_mu)
        return loss

    return sgd_epochs(model, x, y, opt, loss_fn, device, precision, desc, progress)


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor],
                  mu: float) -> torch.Tensor:
    """FedProx (Li et al. 2020, Eq. 2): (mu / 2) * sum over tensors of ||w - w^t||_2^2."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))  # type: ignore[return-value]


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device,
                   batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    """Eval-mode logits (N, C) on the CPU, in fp32.

    With bf16 (:func:`uses_bf16` of ``precision``) the forwards run under bf16 autocast with
    channels-last weights and inputs (oneDNN's bf16 convolutions want NHWC; bf16 alone barely
    helps on CPU); a model stored in NCHW is put back in NCHW afterwards.
    """
    model.to(device).eval()
    fast = uses_bf16(device, precision) and x.dim() == 4
    # Restore only what this call changed: a model stored channels-last stays so.
    relayout = fast and not is_channels_last(model)
    if relayout:
        model.to(memory_format=torch.channels_last)
    try:
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)  # (b, C_in, H, W)
            if fast:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out.append(model(xb).float().cpu())  # (b, C)
    finally:
        if relayout:
            model.to(memory_format=torch.contiguous_format)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             precision: str = "fp32") -> float:
    """Top-1 accuracy; NaN on an empty set (reported as missing, never as 0)."""
    if len(y) == 0:
        return float("nan")
    logits = predict_logits(model, x, device, precision=precision)
    return float((logits.argmax(1) == y).float().mean())


class EvaluationSplits(Protocol):
    """A site's two evaluation views (``fedbicross_flwr.data.site.SiteData`` has them):
    the official test split (``x_test``, ``y_test``) and the label-following personal split
    (``x_test_personal``, ``y_test_personal``).
    """

    @property
    def x_test(self) -> Tensor: ...  # noqa: D102

    @property
    def y_test(self) -> Tensor: ...  # noqa: D102

    @property
    def x_test_personal(self) -> Tensor: ...  # noqa: D102

    @property
    def y_test_personal(self) -> Tensor: ...  # noqa: D102


def model_fingerprint(model: nn.Module) -> str:
    """BLAKE2b digest of a model's state (names, dtypes, shapes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Official-test accuracies of received models, by model fingerprint. Clients of one process
# that receive the same model (FedAvg-1, central, the multi-round references: every client;
# FedBiCross: each cluster's) evaluate it once. The split tensors are kept in the entry, so the
# data pointers in the key cannot be reused by other tensors while the entry exists.
_SHARED_EVAL: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = OrderedDict()
_SHARED_EVAL_SIZE = 16


def shared_split_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          device: torch.device, precision: str = "fp32") -> float:
    """:func:`accuracy` on a split shared by the clients (the official test), remembered.

    Same value as ``accuracy(model, x, y, device, precision)``; a model with the same state on
    the same split tensors is not forwarded again.
    """
    key = (model_fingerprint(model), x.data_ptr(), tuple(x.shape), y.data_ptr(),
           tuple(y.shape), device.type, precision)
    if key in _SHARED_EVAL:
        _SHARED_EVAL.move_to_end(key)
        return _SHARED_EVAL[key][2]
    acc = accuracy(model, x, y, device, precision)
    _SHARED_EVAL[key] = (x, y, acc)
    while len(_SHARED_EVAL) > _SHARED_EVAL_SIZE:
        _SHARED_EVAL.popitem(last=False)
    return acc


def evaluate_views(model: nn.Module, site: EvaluationSplits, device: torch.device,
                   precision: str = "fp32", shared: bool = False) -> dict[str, float]:
    """Accuracy on the official test split and on the label-following personal split.

    The client reports these in phase 3, and the server computes the same on the model a site
    returns (``fedbicross_flwr.reports.scoring``), so both sides call this one function.

    ``shared=True`` remembers the official-test accuracy by model fingerprint (for models that
    several clients receive); ``precision`` is the run config's ``eval-precision``.
    """
    official = shared_split_accuracy if shared else accuracy
    return {"test-acc": official(model, site.x_test, site.y_test, device, precision),
            "test-acc-personal": accuracy(model, site.x_test_personal, site.y_test_personal,
                                          device, precision)}

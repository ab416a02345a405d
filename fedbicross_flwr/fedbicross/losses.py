"""Losses of FedBiCross alone: the teacher schedule of Eq. 5 and personalization (Eq. 9).

The KD and DeepInversion losses it shares with the baselines are in
:mod:`fedbicross_flwr.distill.losses`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lambda_schedule(t: int, T: int) -> float:
    """Weight of the noise-adapted teacher at trajectory step ``t`` (Eq. 5).

    lambda^(t) = 1 - t / T, so early (noisy) images rely on the noise-adapted teacher F~ and
    late (realistic) images on the original teacher F.

    Parameters
    ----------
    t : int
        Step index in 1..T (x^(t) is the image after the t-th synthesis update).
    T : int
        Trajectory length.

    Returns
    -------
    float
        1 - t/T, in [0, 1).
    """
    if T < 1 or not 0 <= t <= T:
        raise ValueError(f"need 0 <= t <= T and T >= 1, got t={t}, T={T}")
    return 1.0 - t / T


def personalization_loss(
    logits: Tensor,
    labels: Tensor,
    cluster_logits: Tensor,
    own_logits: Tensor,
    gamma: float,
    delta: float,
) -> Tensor:
    """Personalized distillation loss of Eq. 9 (Stage 3, run by the client).

    L_pers = CE(f_pers(x), y) + gamma * KL(G_k(x) || f_pers(x)) + delta * KL(f_i(x) || f_pers(x)),
    all at temperature 1 (the paper gives no temperature for Eq. 9), KL batch-mean. G_k (the
    cluster model) and f_i (the client's own uploaded model) are frozen teachers: their logits
    are detached here.

    Parameters
    ----------
    logits : Tensor
        (B, C) logits of f_pers.
    labels : Tensor
        (B,) int64 class labels.
    cluster_logits : Tensor
        (B, C) logits of G_k^(T).
    own_logits : Tensor
        (B, C) logits of the client's own model f_i.
    gamma, delta : float
        Weights (paper: 0.5 and 0.3).

    Returns
    -------
    Tensor
        Scalar.
    """
    log_q = F.log_softmax(logits, dim=1)  # (B, C)
    ce = F.nll_loss(log_q, labels)
    kl_cluster = F.kl_div(log_q, F.softmax(cluster_logits.detach(), dim=1), reduction="batchmean")
    kl_own = F.kl_div(log_q, F.softmax(own_logits.detach(), dim=1), reduction="batchmean")
    return ce + gamma * kl_cluster + delta * kl_own

"""FedBiCross's own server-side weight: the teacher schedule of Eq. 5.

The KD and DeepInversion losses it shares with the baselines are in
:mod:`fedbicross_flwr.distill.losses`; the personalization loss of Eq. 9, which the client
runs, is :func:`fedbicross_flwr.client.personalization_loss`.
"""

from __future__ import annotations


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

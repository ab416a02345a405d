"""The data-free distillation toolkit that FedBiCross and the baselines share.

:mod:`.synthesis` (trajectory DeepInversion, FedBiCross Eq. 1-2, and the teacher ensemble),
:mod:`.noise_adapt` (noise-adapted teachers, Eq. 3, and soft labels), :mod:`.losses` (KD and
the DeepInversion priors), :mod:`.utils` (seeds, autocast, train/eval modes, memory layout)
and :mod:`.plots` (picture grids of synthetic images). Nothing here imports
:mod:`fedbicross_flwr.fedbicross`.
"""

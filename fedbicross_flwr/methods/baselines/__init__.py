"""The paper's data-free one-shot baselines as server methods (FedBiCross paper, Sec. IV).

Each method turns the N uploaded client models into ONE global model sent to every client:

``fedisca``     FedISCA (Kang et al., 2023): DeepInversion trajectory over all clients,
                noise-adapted teacher, one KD step per trajectory step (:mod:`.fedisca`).
``dense``       DENSE (Zhang et al., 2022): a generator with BN-statistics, CE and a masked
                adversarial loss; KD over the growing synthetic pool (:mod:`.dense`).
``coboosting``  Co-Boosting (Dai et al., 2024): hard-sample generator, per-client ensemble
                weights by sign gradient, ODS-perturbed KD (:mod:`.coboosting`).
``dafl``        DAFL (Chen et al., 2019): generator with one-hot, information-entropy and
                activation losses, student distilled at the same time (:mod:`.dafl`).

The generator-based methods share :mod:`.generator` (network, losses, pool, KD pass); the
helpers every method needs (client models, student start, artefacts) are in :mod:`.common`.
"""

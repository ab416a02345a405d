"""Experiments: the harness of experiment grids (:mod:`.harness`, ``fedbicross grid``), the
server-stage benchmark (:mod:`.benchmark`, ``fedbicross bench``) and the distillation check
(:mod:`.distill_check`, ``fedbicross distill-check``).
"""

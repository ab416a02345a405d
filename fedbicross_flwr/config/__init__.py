"""Configuration: the run config (:mod:`.run_config`), its generated mirrors (:mod:`.table`).

:mod:`.run_config` parses and validates every run-config key (``[tool.flwr.app.config]``,
presets in ``conf/``, ``--run-config`` overrides); :mod:`.table` writes the docs' key table and
pyproject's defaults from it; :mod:`.settings` derives the server-side distillation settings
(FedBiCross, FedISCA, cluster-fedavg) from the keys tagged ``setting``.
"""

"""Configuration: the whole run config (:mod:`.run_config`) and its generated mirrors
(:mod:`.table`).

A key is a field of a small frozen section next to its user, named by the field
(:mod:`fedbicross_flwr.keys.fields`): the shared keys in :mod:`fedbicross_flwr.keys.sections`,
the distilling methods' shared keys in :mod:`fedbicross_flwr.distill.config`, FedBiCross's in
:mod:`fedbicross_flwr.fedbicross.config`, the baselines' in
:mod:`fedbicross_flwr.methods.baselines.config`, the multi-round references' in
:mod:`fedbicross_flwr.methods.flower_strategies`. :mod:`.run_config` joins them into
:class:`~.run_config.RunConfig` and parses ``[tool.flwr.app.config]``, the presets in ``conf/``
and ``--run-config`` overrides; :mod:`.table` writes the docs' key table and pyproject's
defaults from it. Below the methods a module reads
:class:`~fedbicross_flwr.keys.sections.SharedConfig` or its own section, never RunConfig.
"""

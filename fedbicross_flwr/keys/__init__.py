"""How a run-config key is declared (:mod:`.fields`), its error (:mod:`.errors`) and the keys
every method shares (:mod:`.sections`, with :class:`~.sections.SharedConfig`).

The ground floor of the configuration: the methods declare their own sections with
:func:`~.fields.key` next to their code, and :mod:`fedbicross_flwr.config` (above the methods)
joins them all into the run configuration.
"""

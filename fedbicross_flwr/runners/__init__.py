"""Runners: what starts a run and calls the server (:mod:`fedbicross_flwr.server`).

:mod:`.direct` runs the server protocol in one process over the direct transport;
:mod:`.inprocess` runs the Flower apps in one process with an in-memory Grid;
:mod:`.simulation` drives ``flwr run`` on a local SuperLink, and :mod:`.resources` samples the
peak memory of its processes. The transports the server calls are below it, in
:mod:`fedbicross_flwr.transports`.
"""

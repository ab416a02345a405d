"""Engines: how the server reaches its clients.

:mod:`.transport` is the interface the server methods call; :mod:`.direct` implements it with
plain function calls (one process, no Flower runtime), :mod:`.grid_transport` over Flower's Grid
(simulation or deployment). :mod:`.inprocess` runs the Flower apps in one process with an
in-memory Grid; :mod:`.simulation` drives ``flwr run`` on a local SuperLink.
"""

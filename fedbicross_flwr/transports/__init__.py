"""Transports: how the server reaches its clients.

:mod:`.transport` is the interface the server and the methods call; :mod:`.direct` implements
it with plain function calls (one process, no Flower runtime), :mod:`.grid_transport` over
Flower's Grid (simulation or deployment). :mod:`.replies` reads and checks the clients'
replies (for the Grid transport and the one-shot strategies alike), :mod:`.communication`
counts the bytes sent. Nothing here imports the server, the runners
(:mod:`fedbicross_flwr.runners`), the strategies or the methods.
"""

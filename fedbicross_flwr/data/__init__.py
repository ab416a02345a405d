"""Data: datasets and their archives (:mod:`.datasets`), client partitions (:mod:`.partition`)
and a client's local data in simulation or deployment (:mod:`.site`).
"""

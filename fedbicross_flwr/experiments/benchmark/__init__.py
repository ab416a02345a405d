"""Benchmarks of the FedBiCross server stage: real path vs a reference-style path, scaling.

:mod:`.server_stage` (``run_benchmark``), :mod:`.reference`, :mod:`.scaling`, :mod:`.cli`.
Nothing is imported here, so ``fedbicross --help`` stays fast.
"""

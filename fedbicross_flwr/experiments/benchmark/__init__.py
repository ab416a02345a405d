"""Benchmarks of the FedBiCross server stage: real path vs a reference-style path, scaling.

:mod:`.server_stage` (``run_benchmark``), :mod:`.reference`, :mod:`.scaling`, the device check
(``--device-check``: :mod:`.device_report` with :mod:`.device_check` and :mod:`.peak`),
:mod:`.cli`.
Nothing is imported here, so ``fedbicross --help`` stays fast.
"""

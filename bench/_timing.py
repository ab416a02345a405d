"""Shared timing helper of the bench/ scripts (run as ``python bench/<script>.py``)."""
import time


def best_ms(fn, reps: int = 10) -> float:
    """Best of ``reps`` timed calls of ``fn`` in milliseconds, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)

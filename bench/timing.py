"""What the bench scripts share: wall-clock timing of one call."""
import time


def timed(fn) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

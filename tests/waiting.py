"""The one way tests wait: poll a condition until a deadline, never a bare
sleep standing in for it."""

import time


def until(predicate, timeout: float = 15, what: str = "condition", every: float = 0.2) -> float:
    """Poll predicate every `every` s until it is true; the seconds it took.
    Fails naming `what` after timeout seconds."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(every)
    return time.monotonic() - start

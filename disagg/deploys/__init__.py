"""The deploy files pyinfra runs (once per host, so they are files, not
functions to import): `disagg deploy` passes their paths to pyinfra, and a
checkout's `deploys/` links to them for `pyinfra INVENTORY deploys/NAME.py`."""

from pathlib import Path

NAMES = ("disagg", "baseline", "model", "teardown")


def path(name: str) -> Path:
    """The packaged deploy file NAME (one of NAMES)."""
    return Path(__file__).resolve().parent / f"{name}.py"

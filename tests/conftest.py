import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def controller_state(tmp_path_factory):
    """The controller's state (the deployments' CAs, disagg/core/pki.py) in a
    directory of this run's, not the user's (unless DISAGG_STATE_DIR says
    where: to keep it across runs on hosts kept up)."""
    if os.environ.get("DISAGG_STATE_DIR"):
        yield os.environ["DISAGG_STATE_DIR"]
        return
    os.environ["DISAGG_STATE_DIR"] = str(tmp_path_factory.mktemp("controller-state"))
    yield os.environ["DISAGG_STATE_DIR"]
    del os.environ["DISAGG_STATE_DIR"]

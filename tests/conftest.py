import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def controller_state(tmp_path_factory, monkeypatch):
    """Each test's own controller state (the deployments' CAs,
    disagg/core/pki.py): never the user's, nor another test's."""
    state = tmp_path_factory.mktemp("controller-state")
    monkeypatch.setenv("DISAGG_STATE_DIR", str(state))
    return str(state)

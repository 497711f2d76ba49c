"""disagg/agent/stage.py against a local server in the hub's layout: it
stages the commit it is given (what the controller resolved, or what the
host's peers hold), whatever main names by then."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hubserver import Hub


def _repo(root, weights: bytes):
    root.mkdir()
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (root / "model.safetensors").write_bytes(weights)  # LFS: checked by sha256
    return root


def _stage(hub: Hub, revision: str, dest, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HOME": str(home), "HF_HOME": str(home / "hf")}
    return subprocess.run(
        [sys.executable, "-m", "disagg.agent.stage", "--repo", "org/tiny", "--revision", revision, "--dest", str(dest)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_commit_given_is_staged_and_written_beside_the_stamp_though_main_moved(tmp_path):
    old, new = os.urandom(1 << 16), os.urandom(1 << 16)
    with Hub("org/tiny", _repo(tmp_path / "r1", old)) as hub:
        first = hub.commit
        assert hub.publish(_repo(tmp_path / "r2", new)) != first  # main moves on
        dest = tmp_path / "models" / "main"
        run = _stage(hub, first, dest, tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        assert (dest / "model.safetensors").read_bytes() == old
        assert (tmp_path / "models" / "main.commit").read_text() == first + "\n"
        assert set(json.loads((tmp_path / "models" / "main.manifest.json").read_text())) == {
            "config.json",
            "model.safetensors",
        }
        # moved to main: its commit, its weights
        run = _stage(hub, "main", dest, tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        assert (dest / "model.safetensors").read_bytes() == new
        assert (tmp_path / "models" / "main.commit").read_text() == hub.commit + "\n"

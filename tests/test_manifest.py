"""What a push or a model staging does, from a controller directory and a
host's StagedTree output (the real fact command run on this machine)."""

import json
import os
import subprocess

import pytest

from disagg.core import manifest
from disagg.infra.facts import StagedTree


def _tree(root, files):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _staged(dest, hashes=True):
    """The fact's own command and parser, on a local directory."""
    fact = StagedTree()
    out = subprocess.run(["sh", "-c", fact.command(str(dest), hashes)], capture_output=True, text=True, check=True)
    return fact.process(out.stdout.splitlines())


def _stamp(dest, wanted):
    # the stamp is written after the files: older files are trusted by size
    past = os.stat(dest).st_mtime - 10
    for path in dest.rglob("*"):
        os.utime(path, (past, past))
    with open(manifest.stamp_path(str(dest)), "w") as f:
        f.write(manifest.text(wanted))


def test_a_copy_is_a_no_op_and_each_damage_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, dest = tmp_path / "src", tmp_path / "dest"
    files = {"config.json": b"{}", "model.safetensors": b"x" * 4096, "sub/tokenizer.json": b"tok"}
    _tree(src, files)
    wanted = manifest.of(src)
    assert wanted["model.safetensors"] == (4096, manifest.sha256(src / "model.safetensors"))

    # nothing there: everything pushed
    assert manifest.changes(wanted, _staged(dest)).push == sorted(files)

    # a copy without a stamp: hashed once, only the stamp is written
    _tree(dest, files)
    first = manifest.changes(wanted, _staged(dest))
    assert (first.push, first.remove, first.restamp) == ([], [], True)

    # stamped: a no-op that hashes nothing
    _stamp(dest, wanted)
    staged = _staged(dest)
    assert staged.rehashed == {} and manifest.changes(wanted, staged).none

    # partial (shorter), corrupted (same size, written after the stamp), extra
    (dest / "sub/tokenizer.json").write_bytes(b"to")
    (dest / "model.safetensors").write_bytes(b"y" * 4096)
    later = os.stat(manifest.stamp_path(str(dest))).st_mtime + 1
    os.utime(dest / "model.safetensors", (later, later))  # the clock's tick may not have moved
    (dest / "stale.safetensors").write_bytes(b"old")
    damaged = manifest.changes(wanted, _staged(dest))
    assert sorted(damaged.push) == ["model.safetensors", "sub/tokenizer.json"]
    assert damaged.remove == ["stale.safetensors"]


def test_a_touched_file_with_its_content_is_restamped_not_pushed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, dest = tmp_path / "src", tmp_path / "dest"
    _tree(src, {"a.bin": b"a"})
    _tree(dest, {"a.bin": b"a"})
    wanted = manifest.of(src)
    _stamp(dest, wanted)
    later = os.stat(manifest.stamp_path(str(dest))).st_mtime + 1
    os.utime(dest / "a.bin", (later, later))
    todo = manifest.changes(wanted, _staged(dest))
    assert (todo.push, todo.restamp) == ([], True)


def test_controller_hashes_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "src"
    _tree(src, {"w.bin": b"one", ".cache/huggingface/x.lock": b""})
    assert list(manifest.of(src)) == ["w.bin"]  # hf's bookkeeping is not the model
    calls = []
    real = manifest.sha256
    monkeypatch.setattr(manifest, "sha256", lambda p: calls.append(p) or real(p))
    manifest.of(src)
    assert calls == []
    (src / "w.bin").write_bytes(b"two")
    assert manifest.of(src)["w.bin"][1] == real(src / "w.bin") and len(calls) == 1


def test_a_damaged_stamp_trusts_no_file(tmp_path):
    dest = tmp_path / "dest"
    _tree(dest, {"a.bin": b"a"})
    with open(manifest.stamp_path(str(dest)), "w") as f:
        f.write("{not json")
    staged = _staged(dest)
    assert staged.stamp is None
    assert manifest.changes({"a.bin": (1, manifest.sha256(dest / "a.bin"))}, staged).push == ["a.bin"]
    assert json.loads(manifest.text({"a.bin": (1, "h")})) == {"a.bin": [1, "h"]}


def test_links_and_loosened_modes_are_found_and_never_followed(tmp_path):
    """What a service user could plant where root writes: the fact names it
    (roles/transfer.py removes it) and lists nothing behind a link."""
    outside, dest = tmp_path / "outside", tmp_path / "dest"
    _tree(outside, {"keep": b"canary"})
    _tree(dest, {"a.bin": b"a", "sub/b.bin": b"b"})
    os.chmod(dest / "sub/b.bin", 0o644)
    clean = _staged(dest)
    assert (clean.kind, clean.foreign) == ("d", ())
    if os.geteuid() == 0:  # root's files: nothing to replace
        assert clean.loose is None and not clean.unsafe
    (dest / "evil").symlink_to(outside)
    (dest / "sub/file").symlink_to(outside / "keep")
    os.chmod(dest / "sub/b.bin", 0o666)
    staged = _staged(dest)
    assert sorted(staged.foreign) == ["evil", "sub/file"] and staged.unsafe
    assert set(staged.sizes) == {"a.bin", "sub/b.bin"}  # nothing behind a link listed
    assert staged.loose is not None
    # the tree's path itself a link to a tree: nothing in it listed, the stamp not read through a link
    link = tmp_path / "link"
    link.symlink_to(outside)
    os.symlink(outside / "keep", manifest.stamp_path(str(link)))
    linked = _staged(link)
    assert (linked.kind, linked.sizes, linked.stamp) == ("l", {}, None) and linked.unsafe
    assert manifest.changes({"keep": (6, manifest.sha256(outside / "keep"))}, linked).push == ["keep"]


def test_a_file_name_with_a_control_character_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _tree(tmp_path / "src", {"ok.bin": b"1", "x\nEOF\nrm -rf y": b"2"})
    with pytest.raises(ValueError, match=r"file name 'x\\nEOF\\nrm -rf y' holds a control character; rename it"):
        manifest.of(tmp_path / "src")

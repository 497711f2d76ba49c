"""`python -m disagg.agent.stage`: a hub model into a directory on this
host before any worker starts, run by the deploy (roles/model.py) with the
engine's venv, whose huggingface_hub does the download (resumable; the
endpoint from HF_ENDPOINT, the token from HF_TOKEN in the root-only env
file, read as data). Every file is then checked against the checksums the hub lists (LFS
files by sha256, others by their git blob sha1); one that fails is fetched
again once. Last, the commit and the manifest are written beside the
directory (`<dest>.commit`, `<dest>.manifest.json`, as disagg/core/manifest.py
reads them): a re-run for that commit with that stamp in place and no file
changed since is a no-op."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

from disagg.agent import envfile

_CHUNK = 1 << 20


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one read."""
    sha256, blob = hashlib.sha256(), hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            sha256.update(block)
            blob.update(block)
    return sha256.hexdigest(), blob.hexdigest()


def _check(dest: Path, tree: dict) -> tuple[dict[str, list], list[str]]:
    """The manifest of dest's files in tree, and the files that fail the hub's checksums."""
    manifest, bad = {}, []
    for name, entry in sorted(tree.items()):
        path = dest / name
        if not path.is_file() or path.stat().st_size != entry.size:
            bad.append(name)
            continue
        sha256, blob = _digests(path)
        wanted = entry.lfs.sha256 if entry.lfs else entry.blob_id
        if (sha256 if entry.lfs else blob) != wanted:
            bad.append(name)
            continue
        manifest[name] = [entry.size, sha256]
    return manifest, bad


def _progress(dest: Path, total: int, done: threading.Event) -> None:
    """A line every 10 s: what is on disk of total (pyinfra -vvv prints it as it comes)."""
    while not done.wait(10):
        have = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        print(f"stage: {have / 1e9:.2f} of {total / 1e9:.2f} GB", flush=True)


def _replace(path: Path, text: str) -> None:
    path.with_suffix(".tmp").write_text(text + "\n")
    path.with_suffix(".tmp").replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg.agent.stage", description=__doc__)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", default="main")
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--token-file", type=Path, help="an env file with HF_TOKEN (read, never sourced)")
    args = parser.parse_args(argv)
    if args.token_file and args.token_file.is_file():
        token = envfile.value(args.token_file.read_text().splitlines(), "HF_TOKEN")
        if token:
            os.environ["HF_TOKEN"] = token
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own lines instead
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    commit = api.model_info(args.repo, revision=args.revision).sha
    tree = {
        f.path: f for f in api.list_repo_tree(args.repo, revision=commit, recursive=True) if isinstance(f, RepoFile)
    }
    total = sum(f.size for f in tree.values())
    print(f"stage: {args.repo}@{args.revision} = {commit}: {len(tree)} files, {total / 1e9:.2f} GB", flush=True)
    args.dest.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        done = threading.Event()
        threading.Thread(target=_progress, args=(args.dest, total, done), daemon=True).start()
        try:
            snapshot_download(args.repo, revision=commit, local_dir=args.dest)
        finally:
            done.set()
        manifest, bad = _check(args.dest, tree)
        if not bad:
            break
        print(
            f"stage: {len(bad)} files do not match the hub's checksums ({', '.join(bad[:5])}), "
            f"{'fetching them again' if attempt == 1 else 'giving up'}",
            flush=True,
        )
        for name in bad:
            (args.dest / name).unlink(missing_ok=True)
    else:
        return 1
    for path in args.dest.rglob("*"):
        name = path.relative_to(args.dest).as_posix()
        if path.is_file() and name not in tree and not name.startswith(".cache/"):
            path.unlink()  # not in this revision: a stale shard would be loaded
    # the commit first: a stamp vouches for the commit beside it
    _replace(Path(f"{args.dest}.commit"), commit)
    _replace(Path(f"{args.dest}.manifest.json"), json.dumps(manifest, separators=(",", ":")))
    print(f"stage: {args.repo}@{commit} verified in {args.dest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A directory tree as {relative path: (size, sha256)}: what the controller
pushes (a model directory, a wheel set) and what a host has staged. The
host keeps the manifest it was last verified against as a stamp beside the
tree (`stamp_path`); a file changed after the stamp is hashed again, so a
no-op re-run reads sizes and a stamp, never the model's bytes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub's bookkeeping inside a --local-dir download: not the model
SKIPPED = (".cache/",)
_CHUNK = 1 << 20


def stamp_path(tree: str) -> str:
    """Where a host keeps the manifest its copy of tree was verified against."""
    return f"{tree.rstrip('/')}.manifest.json"


def commit_path(tree: str) -> str:
    """Where a host keeps the hub commit its copy of tree was staged from."""
    return f"{tree.rstrip('/')}.commit"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _cache_file(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "disagg" / "manifests"
    return base / f"{hashlib.sha1(str(root).encode()).hexdigest()[:16]}.json"


def of(root: str | Path) -> dict[str, tuple[int, str]]:
    """The manifest of a controller directory. Each file's hash is cached by
    its size and mtime (a 70 GB model is hashed once, not on every run)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    cache_file = _cache_file(root)
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    found, fresh = {}, {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(SKIPPED):
            continue
        if not rel.isprintable():
            # sha256sum -c's lines and the host's listing are one name a line
            raise ValueError(f"{root}: file name {rel!r} holds a control character; rename it")
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns]
        entry = cached.get(rel)
        digest = entry[2] if entry and entry[:2] == key else sha256(path)
        fresh[rel] = [*key, digest]
        found[rel] = (st.st_size, digest)
    if fresh != cached:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(fresh))
    return found


def text(manifest: dict[str, tuple[int, str]]) -> str:
    """The stamp's content: one line of JSON (a fact reads it as one line)."""
    return json.dumps({path: list(entry) for path, entry in sorted(manifest.items())}, separators=(",", ":")) + "\n"


@dataclass(frozen=True)
class Staged:
    """What a host has of a tree (fact StagedTree): the stamp's manifest,
    every file's size, and the sha256 of the files written after the stamp
    (of all of them when there is no stamp)."""

    stamp: dict[str, tuple[int, str]] | None
    sizes: dict[str, int]
    rehashed: dict[str, str]
    # find's type of the tree's path (d, l, f...), None: missing
    kind: str | None = None
    # entries neither file nor directory (links): never followed, removed
    foreign: tuple[str, ...] = ()
    # a path not root's or writable by others (the first one found)
    loose: str | None = None
    # the hub commit it was staged from (commit_path), if it was
    commit: str | None = None

    @property
    def intact(self) -> bool:
        """Stamped, and no file added, resized or written since."""
        return bool(self.stamp) and self.sizes == {p: e[0] for p, e in self.stamp.items()} and not self.rehashed

    @property
    def unsafe(self) -> bool:
        """Whether the tree holds what a service user could have planted."""
        return self.kind not in (None, "d") or bool(self.foreign) or self.loose is not None

    def digest(self, path: str) -> str | None:
        """The sha256 a host's file is known to have, or None."""
        if path not in self.sizes:
            return None
        if path in self.rehashed:
            return self.rehashed[path]
        entry = (self.stamp or {}).get(path)
        return entry[1] if entry and entry[0] == self.sizes[path] else None


def parse_staged(sections: dict[str, list[str]]) -> Staged:
    stamp_lines = [line for line in sections.get("stamp", []) if line.strip()]
    try:
        raw = json.loads(stamp_lines[0]) if stamp_lines else None
        stamp = {p: (int(e[0]), str(e[1])) for p, e in raw.items()} if isinstance(raw, dict) else None
    except (ValueError, TypeError, IndexError):
        stamp = None  # a damaged stamp vouches for no file: all are pushed again
    sizes = {}
    for line in sections.get("files", []):
        path, _, size = line.rpartition("\t")
        if path and size.isdigit() and not path.startswith(SKIPPED):
            sizes[path] = int(size)
    rehashed = {}
    for line in sections.get("rehashed", []):
        digest, _, path = line.partition("  ")
        if path:
            rehashed[path.removeprefix("./")] = digest
    kind = next((line.strip() for line in sections.get("kind", []) if line.strip()), None)
    foreign = tuple(line for line in sections.get("foreign", []) if line)
    loose = next((line for line in sections.get("loose", []) if line), None)
    commit = next((line.strip() for line in sections.get("commit", []) if line.strip()), None)
    return Staged(stamp, sizes, rehashed, kind, foreign, loose, commit)


@dataclass(frozen=True)
class Changes:
    push: list[str]
    remove: list[str]
    restamp: bool

    @property
    def none(self) -> bool:
        return not (self.push or self.remove or self.restamp)


def changes(wanted: dict[str, tuple[int, str]], staged: Staged) -> Changes:
    """Files to push (missing, another size, another hash: partial or
    corrupted), files to remove (not in wanted), and whether the stamp must
    be written again."""
    push = [p for p, (size, digest) in wanted.items() if staged.sizes.get(p) != size or staged.digest(p) != digest]
    remove = sorted(set(staged.sizes) - set(wanted))
    return Changes(push, remove, staged.stamp != wanted or bool(staged.rehashed))

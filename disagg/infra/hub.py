"""The Hugging Face Hub as the controller asks it: a model revision (branch
or tag) resolved to the commit every host then stages, so that hosts staged
at different times serve the same weights."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

from disagg.core.errors import HostError

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(HostError):
    """One line: what could not be resolved, and the fix."""


def commit(repo: str, revision: str, endpoint: str | None = None, token: str | None = None, timeout: float = 30) -> str:
    """The commit `revision` of model `repo` names now (a commit: itself)."""
    if COMMIT.fullmatch(revision):
        return revision
    base = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    url = f"{base}/api/models/{repo}/revision/{urllib.parse.quote(revision, safe='')}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    what = f"model_revision {revision!r} of {repo}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            sha = json.load(response).get("sha")
    except urllib.error.HTTPError as e:
        hint = "give data hf_token (a gated or private model), or " if e.code in (401, 403) else ""
        raise HubError(f"{what}: {base} answered HTTP {e.code}; {hint}check model and model_revision") from None
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as e:
        raise HubError(
            f"{what}: cannot ask {base} from the controller ({e}); set hf_endpoint to a hub it reaches, "
            "or model_revision to a commit"
        ) from None
    if not isinstance(sha, str) or not COMMIT.fullmatch(sha):
        raise HubError(f"{what}: {base} named no commit ({sha!r}); check hf_endpoint")
    return sha
